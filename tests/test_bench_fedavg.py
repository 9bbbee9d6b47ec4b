"""bench/finetune.py's example-weighted mean is the coordinator's FedAvg aggregate.

bench/ keeps a numpy mean because a GPU machine has no flwr; this pins it to what the coordinator
runs (``PrivateFedAvg`` delegates to Flower's ``FedAvg``, which calls ``aggregate_arrayrecords``
weighted by the replies' ``num-examples``), so the benchmark measures the product's aggregation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedpriv.core import contract

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from finetune import weighted_mean  # noqa: E402


def test_bench_weighted_mean_is_flowers_fedavg_aggregate():
    rng = np.random.default_rng(0)
    shapes = {"a.weight": (5, 3), "a.bias": (5,), "b": (2, 5)}
    sizes = [137, 1, 2048, 600]
    updates = [({k: rng.normal(0, 1, s).astype(np.float32) for k, s in shapes.items()}, n) for n in sizes]
    replies = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in values.items()}),
                           "metrics": MetricRecord({contract.NUM_EXAMPLES: n})}) for values, n in updates]
    flower = aggregate_arrayrecords(replies, contract.NUM_EXAMPLES)
    ours = weighted_mean(updates)
    assert set(ours) == set(shapes)
    for key in shapes:
        assert ours[key].dtype == np.float32 and ours[key].shape == shapes[key]
        np.testing.assert_allclose(ours[key], flower[key].numpy(), rtol=0, atol=1e-6)
    unweighted = {k: np.mean([v[k] for v, _ in updates], axis=0) for k in shapes}
    assert max(float(np.abs(ours[k] - unweighted[k]).max()) for k in shapes) > 0.1  # the weights matter here
