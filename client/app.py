"""fedpriv ClientApp: one region's side of a round (Flower Message API).

Thin wiring only: decode the message, let :class:`fedpriv.client.region.RegionRuntime`
do the work, reply. What a reply may carry, the error codes and the
``"<region>|<kind>: <reason>"`` error format are :mod:`fedpriv.core.contract`'s. A region
that must not train (its policy forbids the request, its privacy budget would be
exceeded, its data is unusable) replies with an error message, so the coordinator
can record why and carry on with the other regions.

What leaves a region (:func:`train_metrics`): the DP release and its public facts
only -- N as the region declares it, the mechanism (σ, q, C, steps, δ, accountant)
and ε of this job, which is a function of those public parameters. Train loss and
accuracy, peak memory, lifetime ε and local evaluation leave only when the region's
policy releases them (:mod:`fedpriv.privacy.policy`); the report labels them "not private".

With secure aggregation (a train message whose config carries ``secagg-round``,
:mod:`fedpriv.privacy.secagg.messages`) the train reply carries *no* weights: the
update stays in ``context.state`` and leaves the region only masked, through the
``query.secagg_*`` stages, all handled by :func:`fedpriv.client.secure_aggregation.handle`.
That handler imports nothing heavy (no torch), so a stage handled by a fresh process is
cheap; the train and evaluate handlers import the model code when they run.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv.client import secure_aggregation as secagg
from fedpriv.core import contract as wire
from fedpriv.core.config import FedprivConfig
from fedpriv.core.errors import BudgetExhausted, FedprivError
from fedpriv.privacy.policy import PolicyRefusal, RegionPolicy, deterministic_noise_requested, node_region, region_policy
from fedpriv.privacy.secagg.messages import STAGES, TRAIN_FLAG, action

app = ClientApp()


def _error(msg: Message, region: str, exc: Exception, context: Context | None = None) -> Message:
    """The error reply for ``exc``: a refusal (policy, budget) or a failure, in the contract's format.

    A deployed region (its SuperNode has a log of its own) also logs it there, as one line."""
    kind = wire.POLICY if isinstance(exc, PolicyRefusal) else wire.BUDGET if isinstance(exc, BudgetExhausted) else None
    if context is not None and "region" in context.node_config:  # a simulation's console has the coordinator's line
        print(f"fedpriv: region {region} {'refused' if kind else 'failed'} {msg.metadata.message_type}: "
              f"{' '.join(wire.error_reason(region, str(exc), kind).partition('|')[2].split())}", flush=True)
    return wire.error_reply(msg, region, str(exc), kind)


def _region_label(context: Context, cfg: FedprivConfig | None) -> str:
    try:
        return node_region(context.node_config, cfg)[0] if cfg is not None else f"node-{context.node_id}"
    except FedprivError:
        return f"node-{context.node_id}"


def train_metrics(policy: RegionPolicy, cfg: FedprivConfig, outcome: Any) -> dict[str, float | int]:
    """The train reply's metrics: public facts of the DP release, plus what the policy releases."""
    result = outcome.result
    metrics: dict[str, float | int] = {
        wire.NUM_EXAMPLES: int(result.num_examples),
        wire.DP: int(cfg.dp),  # without DP there is no ε to send (it is ∞): the report records null
        wire.DELTA: policy.delta,
        wire.STEPS: int(outcome.steps),
        wire.NOISE_MULTIPLIER: float(result.noise_multiplier),
        wire.SAMPLE_RATE: float(result.sample_rate),
        wire.MAX_GRAD_NORM: float(cfg.max_grad_norm),
        wire.MAX_EPSILON: policy.max_lifetime_epsilon,
        wire.DETERMINISTIC_NOISE: int(deterministic_noise_requested(cfg)),
    }
    if cfg.dp:
        metrics[wire.EPSILON] = max(0.0, float(outcome.epsilon))
    if policy.release_train_metrics:  # not private: computed on the private batches, outside the DP release
        metrics.update({wire.TRAIN_LOSS: float(result.loss), wire.TRAIN_ACCURACY: float(result.accuracy),
                        wire.PEAK_MEMORY_MB: float(result.peak_memory_mb)})
    if policy.release_lifetime_epsilon and cfg.dp:  # reveals that other jobs used this data
        metrics[wire.LIFETIME_EPSILON] = max(0.0, float(outcome.lifetime_epsilon))
    return metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedpriv.client import runtime_cache
    from fedpriv.client.region import identify_region
    from fedpriv.task.model import from_array_record, to_array_record

    cfg: FedprivConfig | None = None
    try:
        cfg = FedprivConfig.from_run_config(context.run_config)
        identity = identify_region(context.node_config, cfg)
        server_round = int(msg.content[wire.CONFIG].get("server-round", 0))
        secagg_round = msg.content[wire.CONFIG].get(TRAIN_FLAG)
        global_values = from_array_record(msg.content[wire.ARRAYS])
        with runtime_cache.kept(cfg, identity) as region:  # dropped if the round raises (hooks may be left)
            outcome = region.train(global_values, server_round, job_id=cfg.job_id or str(context.run_id),
                                   attempt_id=str(context.run_id), secure_round=secagg_round is not None)
    except FedprivError as exc:
        return _error(msg, _region_label(context, cfg), exc, context)

    history = [float(x) for entry in outcome.history for x in entry] or [0.0]
    content = RecordDict({
        wire.METRICS: MetricRecord(train_metrics(identity.policy, cfg, outcome)),
        wire.REGION: ConfigRecord({"name": identity.name, "history": history, "accountant": identity.policy.accountant,
                                   "privacy-unit": identity.policy.privacy_unit}),
    })
    result = outcome.result
    if secagg_round is None:
        secagg.forget(context.state)
        content[wire.ARRAYS] = to_array_record(result.values)
    else:  # secure aggregation: the update stays here and leaves only masked (a reused release: its own base)
        base = getattr(outcome, "base", None) or global_values
        secagg.keep_update(context.state, int(secagg_round), identity.name, base, result.values, result.num_examples)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg: FedprivConfig | None = None
    try:
        cfg = FedprivConfig.from_run_config(context.run_config)
        policy = region_policy(context.node_config, cfg)
        if not policy.release_local_evaluation:  # refused before the model is even loaded
            from fedpriv.client.region import LOCAL_EVALUATION_REFUSED

            raise PolicyRefusal("release-local-evaluation", LOCAL_EVALUATION_REFUSED)
        from fedpriv.client import runtime_cache
        from fedpriv.client.region import identify_region
        from fedpriv.task.model import from_array_record

        identity = identify_region(context.node_config, cfg)
        with runtime_cache.kept(cfg, identity) as region:
            loss, accuracy, n = region.evaluate(from_array_record(msg.content[wire.ARRAYS]))
    except FedprivError as exc:
        return _error(msg, _region_label(context, cfg), exc, context)
    metrics = MetricRecord({wire.NUM_EXAMPLES: n, wire.EVAL_LOSS: loss, wire.EVAL_ACCURACY: accuracy})
    return Message(content=RecordDict({wire.METRICS: metrics, wire.REGION: ConfigRecord({"name": identity.name})}),
                   reply_to=msg)


# ------------------------------------------------------------------ secure aggregation stages

for _stage in STAGES:  # query.secagg_advertise ... query.secagg_reveal: one handler module
    app.query(action(_stage))(secagg.handle)
