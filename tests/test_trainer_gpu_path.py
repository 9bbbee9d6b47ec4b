"""The local trainer's GPU-facing choices, checked on CPU with the tiny model.

* ``mixed-precision = "bf16"``: the forward pass is autocast, but a DP step with book-keeping clipping
  (the only clipping the config accepts under bf16) still clips every contribution to ``max-grad-norm``
  and adds the same fp32 noise as the fp32 step. Tolerance: the bf16 and fp32 clipped sums differ by at
  most 5e-3·C (bf16 changes the per-sample gradients a little, not the bound); the bound itself holds to
  1e-5·C. Ghost clipping under bf16 overshoots C (measured 1.0023·C) and Opacus' hooks let one post change
  the other posts' bf16 per-sample gradients (tests/adversary/test_clipping_bound.py), so both are refused.
* ``local-optimizer``: DP-Adam(W) is Opacus' clipping and noise in front of torch's Adam(W).
* Device helpers: autocast dtype selection, exact-fp32 matmuls around the DP arithmetic (the CUDA
  branches run here with faked CUDA calls). The release's generators: tests/test_randomness.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch

import fedpriv.task.device as device_mod
from fedpriv.client.trainer import LocalTrainer, local_optimizer
from conftest import TINY
from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError
from fedpriv.task.features import FeatureDataset, SplitClassifier
from fedpriv.task.model import build_model, get_trainable

C = 0.01


@functools.cache
def _model(trainable: str, lora_rank: int = 0):
    return build_model("tiny", trainable, seed=0, pooling="mean", lora_rank=lora_rank)


def _data(n: int, identical: bool = False, tokens: int = 6) -> FeatureDataset:
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((tokens, _model("all").config.hidden_size)).astype(np.float16) for _ in range(n)]
    if identical:  # every example the same: the clipped sum is then exactly N·C long
        return FeatureDataset([feats[0]] * n, [1] * n)
    return FeatureDataset(feats, [i % 2 for i in range(n)])


def _cfg(**overrides):
    return resolve_config({**TINY, "batch-size": 64, "physical-batch-size": 16, "local-epochs": 1.0,
                           "learning-rate": 1.0, "momentum": 0.0, "max-grad-norm": C, "grad-sample-mode": "hooks",
                           "insecure-deterministic-noise": True, **overrides})[1]


def _update(cfg, data, sigma=0.0, trainable="all", lora_rank=0) -> np.ndarray:
    split = SplitClassifier(copy.deepcopy(_model(trainable, lora_rank)), trainable)
    start = get_trainable(split.model)
    result = LocalTrainer(split, data, cfg, torch.device("cpu")).train([], noise_multiplier=sigma, seed=5)
    assert np.isfinite(result.loss)
    return np.concatenate([(result.values[k] - start[k]).ravel() for k in start]).astype(np.float64)


# --- mixed precision --------------------------------------------------------------------------------


BK = {"grad-sample-mode": "bk"}


def test_bf16_dp_step_clips_to_the_bound_like_the_fp32_step():
    same = _data(64, identical=True)
    for mp in ("off", "bf16"):
        # one step, q = 1, lr 1, σ = 0: the update is the mean of 64 identical clipped gradients, length C
        norm = np.linalg.norm(_update(_cfg(**BK, **{"mixed-precision": mp}), same)) / C
        assert norm == pytest.approx(1.0, abs=1e-5), mp
    varied = _data(64)
    fp32, bf16 = _update(_cfg(), varied), _update(_cfg(**BK, **{"mixed-precision": "bf16"}), varied)
    assert np.linalg.norm(fp32) > 0.01 * C, "the step must move the model for the comparison to mean anything"
    assert np.linalg.norm(bf16 - fp32) / C < 5e-3


def test_bf16_dp_step_adds_the_same_fp32_noise():
    data = _data(64)
    noise = {}
    for mp in ("off", "bf16"):
        cfg = _cfg(**BK, **{"mixed-precision": mp})  # testing key: both draw the same noise from the seed
        noise[mp] = _update(cfg, data, sigma=2.0) - _update(cfg, data, sigma=0.0)
    assert noise["off"].std() == pytest.approx(2.0 * C / 64, rel=0.15)
    # the same draws; the differences are fp32 rounding of parameter values ~1 (1.2e-7 = 4e-4 of a noise std)
    np.testing.assert_allclose(noise["bf16"], noise["off"], atol=1e-3 * noise["off"].std())


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_opacus_clipping_under_bf16_is_refused_with_one_line(mode):
    with pytest.raises(ConfigError, match=rf"^mixed-precision = 'bf16': expected 'off' with grad-sample-mode = '{mode}' "
                                          r"\(under bf16 .*'bk' keeps that arithmetic fp32\)$"):
        _cfg(**{"mixed-precision": "bf16", "grad-sample-mode": mode})
    _cfg(**{"mixed-precision": "bf16", "grad-sample-mode": mode, "dp": False})  # no clipping, nothing to break


def test_ghost_clipping_under_bf16_would_break_the_bound():
    # what the refusal prevents (bypassing validation): the bf16 second backward overshoots C
    forced = dataclasses.replace(_cfg(**{"grad-sample-mode": "ghost"}), mixed_precision="bf16")
    assert np.linalg.norm(_update(forced, _data(64, identical=True))) / C > 1.0 + 1e-4


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_parameters_fp32():
    split = SplitClassifier(copy.deepcopy(_model("all")), "all")
    from fedpriv.task.features import collate_features

    batch = collate_features([_data(4)[i] for i in range(4)])
    with device_mod.forward_precision("bf16", torch.device("cpu")):
        out = split.top(**batch)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in split.top.parameters())
    with device_mod.forward_precision("off", torch.device("cpu")):
        assert split.top(**batch).logits.dtype == torch.float32


# --- optimizers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_local_optimizer_is_the_configured_one(name, cls):
    cfg = _cfg(**{"local-optimizer": name, "weight-decay": 0.01, "learning-rate": 0.001})
    opt = local_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    assert type(opt) is cls and opt.defaults["weight_decay"] == 0.01 and opt.defaults["lr"] == 0.001


def test_noiseless_unclipped_dp_adamw_step_equals_the_plain_adamw_step():
    """DP-AdamW = Opacus' clipping + noise in front of AdamW: with neither, the same step as AdamW alone."""
    data = _data(64)
    kw = {"local-optimizer": "adamw", "weight-decay": 0.1, "learning-rate": 1e-3, "max-grad-norm": 1e6}
    private = _update(_cfg(**kw), data)
    plain = _update(_cfg(**kw, dp=False), data)
    assert np.abs(plain).max() > 5e-4  # Adam's first step moves every coordinate by ~lr
    np.testing.assert_allclose(private, plain, atol=2e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"local-optimizer": "lion"}, r"^local-optimizer = 'lion': expected one of sgd, adam, adamw$"),
    ({"local-optimizer": "adam", "momentum": 0.9}, r"^momentum = 0.9: expected 0 with local-optimizer = 'adam'"),
    ({"weight-decay": -0.1}, r"^weight-decay = -0.1: expected a number >= 0$"),
    ({"mixed-precision": "fp16"}, r"^mixed-precision = 'fp16': expected one of off, bf16$"),
    ({"local-optimizer-state": "persist"}, r"^local-optimizer-state = 'persist': expected one of reset, keep$"),
])
def test_bad_trainer_settings_get_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**overrides)


def test_lora_with_dp_adam_and_bf16_trains_on_cpu():
    """The GPU configuration's code path (adapters, DP-Adam, bf16, fresh noise) runs on CPU."""
    cfg = resolve_config({**TINY, "trainable": "all", "lora-rank": 4, "local-optimizer": "adam", "momentum": 0.0,
                          "learning-rate": 1e-2, "mixed-precision": "bf16", "grad-sample-mode": "bk",
                          "batch-size": 16, "physical-batch-size": 8, "noise-multiplier": 0.5})[1]
    update = _update(cfg, _data(32), sigma=0.5, trainable="all", lora_rank=4)
    assert np.isfinite(update).all() and np.abs(update).max() > 1e-4


# --- device helpers ---------------------------------------------------------------------------------


def test_autocast_dtype_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert device_mod.autocast_dtype("off", cpu) is None and device_mod.autocast_dtype("off", cuda) is None
    assert device_mod.autocast_dtype("bf16", cpu) is torch.bfloat16


def test_bf16_on_a_gpu_without_bf16_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match=r"^mixed-precision = 'bf16': this GPU has no bf16 support"):
        device_mod.autocast_dtype("bf16", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device_mod.autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16


def test_exact_fp32_matmul_restores_the_process_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with device_mod.exact_fp32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(KeyError), device_mod.exact_fp32_matmul():
            raise KeyError
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("mode, dp, exact", [("hooks", True, True), ("ghost", True, True), ("bk", True, False),
                                              ("hooks", False, False)])
def test_the_dp_backward_of_opacus_clipping_runs_without_tf32(mode, dp, exact):
    """On CUDA fedpriv turns TF32 on (select_device). Opacus' hooks and ghost clipping form per-sample gradients
    or norms in the backward pass, where a TF32 kernel chosen by the batch's shape let one post move the others'
    contributions (H200: 1.000028 C); so under DP their backward runs in exact fp32. Book-keeping's own
    arithmetic is exact whatever the setting, and a non-private step may use TF32."""
    split = SplitClassifier(copy.deepcopy(_model("all")), "all")
    seen: list[str] = []
    head = [m for m in split.model.modules() if isinstance(m, torch.nn.Linear)][-1]

    def watch_backward(_module, _inputs, out) -> None:
        out.register_hook(lambda grad: seen.append(torch.get_float32_matmul_precision()))

    head.register_forward_hook(watch_backward)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what select_device sets on a GPU
        cfg = _cfg(**{"grad-sample-mode": mode, "dp": dp})
        LocalTrainer(split, _data(64), cfg, torch.device("cpu")).train([], noise_multiplier=0.0, seed=5)
        assert torch.get_float32_matmul_precision() == "high", "the process setting is restored"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest" if exact else "high"}


def test_select_device_takes_the_gpu_and_allows_tf32_there(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert device_mod.select_device(1) == torch.device("cuda")
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("highest")
        assert device_mod.select_device(1, prefer="cpu") == torch.device("cpu")
        assert torch.get_float32_matmul_precision() == "highest"  # CPU: left alone
    finally:
        torch.set_float32_matmul_precision(before)


# --- physical-batch-size = 0 (auto) -----------------------------------------------------------------


def test_auto_physical_batch_on_cpu_is_256_capped_by_the_logical_batch():
    cpu = torch.device("cpu")
    assert device_mod.choose_physical_batch_size(cpu, 1024, per_example_bytes=10**9) == 256
    assert device_mod.choose_physical_batch_size(cpu, 64, per_example_bytes=1) == 64
    split = SplitClassifier(copy.deepcopy(_model("all")), "all")
    trainer = LocalTrainer(split, _data(64), _cfg(**{"physical-batch-size": 0}), cpu)
    assert trainer.physical_batch_size() == 64
    assert LocalTrainer(split, _data(64), _cfg(**{"physical-batch-size": 16}), cpu).physical_batch_size() == 16


@pytest.mark.parametrize("free_gib,per_example_mb,logical,expected", [
    (79, 56, 1024, 512),    # all-MiniLM, hooks: 0.5 * 79 GiB / 56 MB = 757 -> 512
    (79, 14, 1024, 1024),   # ghost: 2,958 fit, capped by the logical batch
    (10, 56, 1024, 64),     # a busy or small GPU
    (0.01, 56, 1024, 1),    # nothing fits: one at a time rather than none
])
def test_auto_physical_batch_on_cuda_fits_half_the_free_memory(monkeypatch, free_gib, per_example_mb, logical, expected):
    cuda = torch.device("cuda")
    free = int(free_gib * 2**30)
    assert device_mod.choose_physical_batch_size(cuda, logical, per_example_mb * 10**6, free_bytes=free) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))  # measured when not given
    assert device_mod.choose_physical_batch_size(cuda, logical, per_example_mb * 10**6) == expected


def test_per_example_memory_estimate_follows_the_clipping_mode_and_precision():
    from fedpriv.client.trainer import per_example_bytes

    ghost_cfg = _cfg(**{"grad-sample-mode": "ghost"})
    top = SplitClassifier(copy.deepcopy(_model("all")), "all").top
    trainable = sum(p.numel() for p in top.parameters() if p.requires_grad)
    hooks = per_example_bytes(top, _cfg(), 64)
    assert hooks > trainable * 4 > 0  # a whole fp32 per-sample gradient, plus activations
    assert per_example_bytes(top, _cfg(), 128) > hooks  # longer posts, more activations
    # ghost clipping keeps two T x T Gram matrices per linear layer instead of the gradient: for 64 tokens
    # and 32-wide layers that costs more than the gradient itself; for a head on pooled vectors far less
    assert per_example_bytes(top, ghost_cfg, 64) > hooks
    head = SplitClassifier(copy.deepcopy(_model("head")), "head").top
    assert per_example_bytes(head, ghost_cfg, 1) < per_example_bytes(head, _cfg(), 1)
    # book-keeping keeps each linear layer's input and output gradient (T x (in + out) values): less than the
    # gradient (in x out) for pooled vectors or all-MiniLM's 384-wide layers, more for 32-wide ones and 64 tokens
    assert per_example_bytes(head, _cfg(**BK), 1) < per_example_bytes(head, _cfg(), 1)
    assert per_example_bytes(top, _cfg(**BK), 64) > per_example_bytes(top, _cfg(**BK), 32)
