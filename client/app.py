"""fedpriv ClientApp: one region's side of a round (Flower Message API).

Thin wiring only: decode the message, let :class:`client.region.RegionRuntime`
do the work, reply. A region that must not train (its privacy budget would be
exceeded, or its data is unusable) replies with an *error message* whose reason
reads ``"<region>|<reason>"``, so the coordinator can record why and carry on
with the other regions.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.region import RegionRuntime, identify_region
from fedpriv.config import FedprivConfig
from fedpriv.errors import BudgetExhausted, FedprivError
from strategies.private_fedavg import REFUSAL_PREFIX
from task.model import from_array_record, to_array_record

app = ClientApp()

REFUSED = 4001
FAILED = 4002


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = FedprivConfig.from_run_config(context.run_config)
    identity = identify_region(context.node_config, cfg)
    server_round = int(msg.content["config"].get("server-round", 0))
    try:
        region = RegionRuntime(cfg, identity)
        outcome = region.train(from_array_record(msg.content["arrays"]), server_round,
                               job_id=cfg.job_id or str(context.run_id), attempt_id=str(context.run_id))
    except BudgetExhausted as exc:
        return Message(Error(code=REFUSED, reason=f"{identity.name}|{REFUSAL_PREFIX} {exc}"), reply_to=msg)
    except FedprivError as exc:
        return Message(Error(code=FAILED, reason=f"{identity.name}|{exc}"), reply_to=msg)

    result = outcome.result
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-accuracy": result.accuracy,
        "epsilon": outcome.epsilon if cfg.dp else -1.0,
        "lifetime-epsilon": outcome.lifetime_epsilon if cfg.dp else -1.0,
        "max-epsilon": identity.max_epsilon,
        "delta": cfg.delta,
        "steps": outcome.steps,
        "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "max-grad-norm": cfg.max_grad_norm,
        "peak-memory-mb": result.peak_memory_mb,
    })
    history = [float(x) for entry in outcome.history for x in entry] or [0.0]
    content = RecordDict({
        "arrays": to_array_record(result.values),
        "metrics": metrics,
        "region": ConfigRecord({"name": identity.name, "history": history}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = FedprivConfig.from_run_config(context.run_config)
    identity = identify_region(context.node_config, cfg)
    try:
        loss, accuracy, n = RegionRuntime(cfg, identity).evaluate(from_array_record(msg.content["arrays"]))
    except FedprivError as exc:
        return Message(Error(code=FAILED, reason=f"{identity.name}|{exc}"), reply_to=msg)
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics, "region": ConfigRecord({"name": identity.name})}),
                   reply_to=msg)
