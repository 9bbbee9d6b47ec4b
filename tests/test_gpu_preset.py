"""The GPU path, checked on CPU: Ray resources for the simulated regions, and the gpu preset trains.

* ``fedpriv simulate`` asks Ray for a GPU share per ClientApp actor when the machine has
  CUDA GPUs (Ray hides every GPU from an actor that asks for none), none on CPU; the
  device count is faked here.
* ``--preset gpu`` (whole encoder, DP-FedSGD with server Adam) trains through the real code path:
  the regions' DP-SGD rounds (:class:`fedpriv.client.region.RegionRuntime`) and the server
  optimizer on their FedAvg, with the tiny model and small data.
"""

from __future__ import annotations


import numpy as np
import pytest

import fedpriv.simulations.runner as runner
from fedpriv.client.region import RegionRuntime, identify_region
from conftest import TINY, write_corpus
from fedpriv.core.config import resolve_config
from fedpriv.core.errors import ConfigError
from fedpriv.simulations.runner import federation_options, gpus_per_region, preset_overrides
from fedpriv.strategies.server_optimizer import ServerOptimizer
from fedpriv.task.data import load_corpus
from fedpriv.task.model import get_trainable
from fedpriv.task.partition import partition_corpus, partition_spec, write_shards


def _cfg(**overrides):
    return resolve_config(overrides)[1]


@pytest.mark.parametrize("regions,gpus,expected", [
    (3, 0, 0.0),        # CPU: no GPU resource at all
    (3, 1, 0.3333),     # one GPU shared by three regions, all at once (3 x 0.3333 <= 1)
    (2, 1, 0.5),
    (3, 2, 0.5),        # ceil(3/2) = 2 regions per GPU
    (5, 3, 0.5),
    (3, 4, 1.0),        # more GPUs than regions: one each
    (7, 1, 0.1428),
])
def test_auto_gpu_share_spreads_regions_evenly(regions, gpus, expected):
    cfg = _cfg(regions=",".join(f"r{i}" for i in range(regions)))
    share = gpus_per_region(cfg, gpus)
    assert share == expected
    if gpus:
        assert share * -(-regions // gpus) <= 1.0  # that many actors fit on one GPU
        assert share * 10_000 == int(share * 10_000)  # Ray's resource unit


def test_federation_options_carry_the_gpu_share_only_with_gpus():
    cfg = _cfg()
    assert federation_options(cfg, 0) == {"num-supernodes": 3, "client-resources-num-cpus": 2}
    assert federation_options(cfg, 1) == {"num-supernodes": 3, "client-resources-num-cpus": 2,
                                          "client-resources-num-gpus": 0.3333}
    fixed = _cfg(**{"sim-gpus-per-region": 1.0})
    assert federation_options(fixed, 1)["client-resources-num-gpus"] == 1.0  # regions take turns on the GPU
    assert "client-resources-num-gpus" not in federation_options(fixed, 0)  # never ask Ray for a missing GPU
    with pytest.raises(ConfigError, match=r"^sim-gpus-per-region = 2: expected at most 1"):
        federation_options(_cfg(**{"sim-gpus-per-region": 2.0}), 1)


@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_bad_gpu_share_is_one_line(value):
    with pytest.raises(ConfigError, match=r"^sim-gpus-per-region = "):
        _cfg(**{"sim-gpus-per-region": value})


def test_simulate_submits_the_gpu_share_it_computed(tmp_path, monkeypatch):
    """The options reach `flwr run --federation-config` (SuperLink and submission faked)."""
    submitted = {}

    class FakeSuperLink:
        address = "127.0.0.1:1"

        def __init__(self, *_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            pass

    class FakeClient:
        def __init__(self, *_):
            pass

        def submit(self, app_dir, run_config, federation):
            submitted.update(federation)
            return 5

        def wait(self, run_id, stream=True):
            return runner.RunOutcome(run_id, "finished:completed", "")

    monkeypatch.setattr(runner, "detect_gpus", lambda: 2)
    monkeypatch.setattr(runner, "prepare_shards", lambda cfg, corpus_dir: tmp_path)
    monkeypatch.setattr(runner, "LocalSimulationSuperLink", FakeSuperLink)
    monkeypatch.setattr(runner, "FlowerRunClient", FakeClient)
    result = runner.Simulation({**TINY, "regions": "a,b,c,d"}, preset="tiny", run_dir=tmp_path / "run").run(stream=False)
    assert result.outcome.succeeded
    assert submitted == {"num-supernodes": 4, "client-resources-num-cpus": 1, "client-resources-num-gpus": 0.5}


def _two_preset_rounds(tmp_path, name: str):
    """Two rounds of two tiny regions with preset ``name``: (config, initial values, final values, optimizer)."""
    preset = preset_overrides(name)
    small = {"model": "tiny", "regions": "us-east,eu-west", "max-examples-per-region": 256, "max-server-examples": 200,
             "batch-size": 64, "physical-batch-size": 32, "num-server-rounds": 2, "num-threads": 1}
    corpus_dir = write_corpus(tmp_path / "corpus", 800)
    _, cfg = resolve_config(small, preset)
    root = tmp_path / "shards"
    write_shards(partition_corpus(load_corpus(corpus_dir), partition_spec(cfg)), root)
    _, cfg = resolve_config({**small, "data-dir": str(root), "run-dir": str(tmp_path / "run")}, preset)
    regions = [RegionRuntime(cfg, identify_region({"partition-id": i}, cfg)) for i in range(2)]
    optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_learning_rate, cfg.server_momentum,
                                cfg.server_beta2, cfg.server_tau)
    start = get_trainable(regions[0].split.model)
    x = start
    for rnd in (1, 2):
        outcomes = [r.train(x, rnd, job_id=f"{name}-preset", attempt_id="a1") for r in regions]
        for out in outcomes:
            assert out.steps > 0 and 0 < out.epsilon <= cfg.target_epsilon + 1e-6
        weights = [out.result.num_examples for out in outcomes]
        avg = {k: sum(w * out.result.values[k] for w, out in zip(weights, outcomes)) / sum(weights) for k in x}
        x = optimizer.step(x, avg)
        assert all(np.isfinite(v).all() for v in x.values())
    assert optimizer.steps == 2
    return cfg, start, x


def test_gpu_preset_trains_the_whole_encoder_as_dp_fedsgd_with_server_adam_on_cpu(tmp_path):
    cfg, start, x = _two_preset_rounds(tmp_path, "gpu")
    assert (cfg.trainable, cfg.local_optimizer, cfg.local_steps, cfg.learning_rate, cfg.server_optimizer,
            cfg.grad_sample_mode, cfg.mixed_precision) == ("all", "sgd", 1, 1.0, "fedadam", "bk", "off")
    assert any(name.startswith(("bert.encoder", "encoder")) or ".encoder." in name for name in start)
    changed = [k for k in start if not np.array_equal(start[k], x[k])]
    encoder = [k for k in start if "encoder" in k]
    assert encoder and set(encoder) <= set(changed)  # every travelling encoder parameter was fine-tuned


def test_cpu_encoder_preset_fine_tunes_the_top_encoder_layer_on_cpu(tmp_path):
    cfg, start, x = _two_preset_rounds(tmp_path, "cpu-encoder")
    assert (cfg.trainable, cfg.local_optimizer, cfg.server_optimizer, cfg.server_momentum, cfg.lora_rank) == \
        ("top-1", "adam", "fedavgm", 0.5, 0)
    layers = {k.split(".layer.")[1].split(".")[0] for k in start if ".layer." in k}
    assert len(layers) == 1, f"only the top encoder layer travels, not {sorted(layers)}"
    changed = [k for k in start if not np.array_equal(start[k], x[k])]
    assert set(start) == set(changed)  # the top layer and the head were fine-tuned
