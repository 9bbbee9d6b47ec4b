"""lora-rank: adapters train under DP-SGD, only adapters + head travel, and the export is a plain model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import TINY, write_corpus
from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError
from fedpriv.task.data import load_corpus
from fedpriv.task.model import build_model, get_trainable
from fedpriv.task.partition import partition_corpus, partition_spec, write_shards

LORA = {**TINY, "trainable": "top-1", "lora-rank": 4, "learning-rate": 2.0}


def test_only_adapters_and_head_are_trainable_and_travel():
    plain = get_trainable(build_model("tiny", "top-1", 0, "mean"))
    lora = get_trainable(build_model("tiny", "top-1", 0, "mean", lora_rank=4))
    assert all(".lora_A." in n or ".lora_B." in n or "classifier" in n or "pre_classifier" in n for n in lora)
    assert any(".lora_B." in n for n in lora) and not any("attention.self.query.weight" in n for n in lora)
    assert sum(v.size for v in lora.values()) < sum(v.size for v in plain.values()) / 2
    # the server and every region build identical adapters from the seed
    again = get_trainable(build_model("tiny", "top-1", 0, "mean", lora_rank=4))
    assert all(np.array_equal(lora[n], again[n]) for n in lora)


def test_dp_rounds_change_the_adapters_within_the_budget(tmp_path):
    from fedpriv.client.region import RegionRuntime, identify_region

    corpus = write_corpus(tmp_path / "corpus", 800)
    _, cfg = resolve_config(LORA)
    write_shards(partition_corpus(load_corpus(corpus), partition_spec(cfg)), tmp_path / "shards")
    _, cfg = resolve_config({**LORA, "num-server-rounds": 2, "target-epsilon": 8.0,
                             "data-dir": str(tmp_path / "shards"), "run-dir": str(tmp_path / "run")})
    region = RegionRuntime(cfg, identify_region({"partition-id": 0}, cfg))
    before = get_trainable(region.split.model)
    values = before
    for rnd in (1, 2):
        outcome = region.train(values, rnd, job_id="job", attempt_id="a")
        values = outcome.result.values
    assert outcome.result.noise_multiplier > 0 and 0 < outcome.epsilon <= 8.0 + 1e-6
    assert set(values) == set(before)
    for name in (n for n in before if ".lora_A." in n or ".lora_B." in n):
        assert np.abs(values[name] - before[name]).max() > 1e-4, name


def test_a_noiseless_unclipped_dp_step_on_the_adapters_equals_the_plain_sgd_step():
    """Opacus issue #820: with some Opacus/PEFT versions LoRA updates came out silently wrong."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(5, 100, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    labels = torch.randint(0, 2, (8,))
    after = []
    for private in (False, True):
        model = build_model("tiny", "top-1", 0, "mean", lora_rank=4).train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the same function both times
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1)  # B = 0 at init would make A's gradient vanish
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        if private:
            loader = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=8)
            model, optimizer, _ = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                               noise_multiplier=0.0, max_grad_norm=1e6,
                                                               poisson_sampling=False)
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
        after.append({n.removeprefix("_module."): p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad})
    plain, private = after
    assert set(plain) == set(private) and any(".lora_A." in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], private[name], atol=1e-6), name


def test_export_merges_the_adapters_into_a_plain_model(tmp_path):
    from fedpriv.server.checkpoints import export_model
    from fedpriv.task.model import load_tokenizer
    from fedpriv.task.modeling_fedpriv import MeanPoolingBertForSequenceClassification

    model = build_model("tiny", "top-1", 0, "mean", lora_rank=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)  # non-zero adapters, so merging matters
    inputs = {"input_ids": torch.randint(5, 100, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    with torch.no_grad():
        expected = model(**inputs).logits
    old_umask = os.umask(0o022)
    try:
        out = export_model(tmp_path, model, load_tokenizer())
    finally:
        os.umask(old_umask)
    # safetensors writes 0600 whatever the umask: the export gives the weights the umask's mode, like config.json
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    loaded = MeanPoolingBertForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)
    assert any(".lora_A." in n for n, _ in model.named_parameters())  # the live model keeps its adapters


@pytest.mark.parametrize("overrides, message", [
    ({"lora-rank": -1}, "lora-rank = -1"),
    ({"lora-rank": 4, "trainable": "head"}, "trainable = 'head'"),
])
def test_bad_lora_settings_get_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({**LORA, **overrides})
