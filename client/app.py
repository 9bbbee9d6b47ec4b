"""fedpriv ClientApp: one region's side of a round (Flower Message API).

Thin wiring only: decode the message, let :class:`client.region.RegionRuntime`
do the work, keep the region's privacy history in ``context.state`` (every
round runs in a fresh process, so nothing else survives between rounds), reply.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.region import RegionRuntime, identify_region
from fedpriv.config import FedprivConfig
from privacy.accountant import RegionAccountant
from task.model import from_array_record, to_array_record

app = ClientApp()

ACCOUNTANT_STATE = "fedpriv-accountant"


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FedprivConfig.from_run_config(context.run_config)
    region = RegionRuntime(cfg, identify_region(context.node_config, cfg))
    server_round = int(msg.content["config"].get("server-round", 0))
    accountant = RegionAccountant.from_record(context.state.config_records.get(ACCOUNTANT_STATE), cfg.accountant)

    values = from_array_record(msg.content["arrays"])
    result, epsilon = region.train(values, server_round, accountant)
    context.state.config_records[ACCOUNTANT_STATE] = accountant.to_record()

    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "epsilon": epsilon if cfg.dp else -1.0,
        "delta": cfg.delta,
        "steps": accountant.total_steps,
        "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "max-grad-norm": cfg.max_grad_norm,
        "peak-memory-mb": result.peak_memory_mb,
    })
    content = RecordDict({
        "arrays": to_array_record(result.values),
        "metrics": metrics,
        "region": ConfigRecord({"name": region.identity.name, "history": _flat_history(accountant)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = FedprivConfig.from_run_config(context.run_config)
    region = RegionRuntime(cfg, identify_region(context.node_config, cfg))
    loss, accuracy, n = region.evaluate(from_array_record(msg.content["arrays"]))
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics, "region": ConfigRecord({"name": region.identity.name})}),
                   reply_to=msg)


def _flat_history(accountant: RegionAccountant) -> list[float]:
    """(σ, q, steps) triples flattened, so the coordinator can recompute ε independently."""
    return [float(x) for entry in accountant.history for x in entry] or [0.0]
