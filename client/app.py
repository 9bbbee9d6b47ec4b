"""fedpriv ClientApp: one region's side of a round (Flower Message API).

Thin wiring only: decode the message, let :class:`client.region.RegionRuntime`
do the work, reply. A region that must not train (its privacy budget would be
exceeded, or its data is unusable) replies with an *error message* whose reason
reads ``"<region>|<reason>"``, so the coordinator can record why and carry on
with the other regions.

With secure aggregation (a train message whose config carries ``secagg-round``,
see :mod:`strategies.secure_fedavg`) the train reply carries *no* weights: the
update stays in ``context.state`` and leaves the region only masked, through the
``query.secagg_*`` handlers below (:mod:`client.secure_aggregation`). Those handlers
import nothing heavy (no torch), so a stage handled by a fresh process is cheap;
the train and evaluate handlers import the model code when they run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure_aggregation as secagg
from fedpriv.config import FedprivConfig
from fedpriv.errors import BudgetExhausted, FedprivError
from privacy.secagg import SecAggError
from strategies.private_fedavg import REFUSAL_PREFIX

app = ClientApp()

REFUSED = 4001
FAILED = 4002


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.region import RegionRuntime, identify_region
    from task.model import from_array_record, to_array_record

    cfg = FedprivConfig.from_run_config(context.run_config)
    identity = identify_region(context.node_config, cfg)
    server_round = int(msg.content["config"].get("server-round", 0))
    secagg_round = msg.content["config"].get(secagg.TRAIN_FLAG)
    global_values = from_array_record(msg.content["arrays"])
    try:
        region = RegionRuntime(cfg, identity)
        outcome = region.train(global_values, server_round,
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
        "dp": int(cfg.dp),  # without DP there is no ε to send (it is ∞): the report records null
        **({"epsilon": outcome.epsilon, "lifetime-epsilon": outcome.lifetime_epsilon} if cfg.dp else {}),
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
        "metrics": metrics,
        "region": ConfigRecord({"name": identity.name, "history": history}),
    })
    if secagg_round is None:
        secagg.forget(context.state)
        content["arrays"] = to_array_record(result.values)
    else:  # secure aggregation: the update stays here and leaves only masked
        rounding_seed = int(np.random.SeedSequence([cfg.seed, identity.index, int(secagg_round), 0x5EC]).generate_state(1)[0])
        secagg.keep_update(context.state, int(secagg_round), identity.name, global_values, result.values,
                           result.num_examples, rounding_seed)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client.region import RegionRuntime, identify_region
    from task.model import from_array_record

    cfg = FedprivConfig.from_run_config(context.run_config)
    identity = identify_region(context.node_config, cfg)
    try:
        loss, accuracy, n = RegionRuntime(cfg, identity).evaluate(from_array_record(msg.content["arrays"]))
    except FedprivError as exc:
        return Message(Error(code=FAILED, reason=f"{identity.name}|{exc}"), reply_to=msg)
    metrics = MetricRecord({"num-examples": n, "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics, "region": ConfigRecord({"name": identity.name})}),
                   reply_to=msg)


# ------------------------------------------------------------------ secure aggregation stages


def _secagg_stage(msg: Message, context: Context, stage: Callable[[RecordDict, ConfigRecord], RecordDict]) -> Message:
    """Run one stage; a refusal (protocol violation, wrong round, bad setup) is an error reply = dropout."""
    info = context.state.config_records.get(secagg.STATE_ROUND)
    region = str(info["region"]) if info is not None else f"node-{context.node_id}"
    try:
        content = stage(context.state, msg.content[secagg.RECORD])
    except (SecAggError, ValueError, KeyError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        return Message(Error(code=FAILED, reason=f"{region}|secure aggregation ({msg.metadata.message_type}): {reason}"),
                       reply_to=msg)
    return Message(content=content, reply_to=msg)


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    cfg = FedprivConfig.from_run_config(context.run_config)
    expected = secagg.expected_setup(cfg.secagg_threshold, cfg.secagg_neighbours, cfg.secagg_clip_range,
                                     cfg.secagg_quant_bits)
    return _secagg_stage(msg, context, lambda state, rec: RecordDict(
        {secagg.RECORD: secagg.advertise(state, context.node_id, rec, expected)}))


@app.query("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda state, rec: RecordDict({secagg.RECORD: secagg.share_keys(state, rec)}))


@app.query("secagg_masked_input")
def secagg_masked_input(msg: Message, context: Context) -> Message:
    def stage(state: RecordDict, rec: ConfigRecord) -> RecordDict:
        masked, metrics = secagg.masked_input(state, rec)
        return RecordDict({"masked": masked, "metrics": metrics})

    return _secagg_stage(msg, context, stage)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda state, rec: RecordDict({secagg.RECORD: secagg.unmask(state, rec)}))


@app.query("secagg_reveal")
def secagg_reveal(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda state, rec: RecordDict({"update": secagg.reveal(state, rec)}))
