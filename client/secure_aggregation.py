"""A region's half of secure aggregation: the ClientApp's secagg stage handlers, in one module.

With ``secure-aggregation = true`` a region never sends its model update in the
clear. The round runs as five message exchanges driven by the coordinator's
:class:`fedpriv.server.secagg_workflow.SecAggWorkflow`; each message may be handled by a
fresh process (as in a deployment), so everything a region must remember between
them lives in ``context.state``:

* ``train`` (the usual train message, flagged ``secagg-round``) -- the region trains
  (DP-SGD), and :func:`keep_update` stores ``update = new values - received global
  values`` (flattened in the received parameter order), its example count and a
  rounding seed *locally*. The reply carries metrics, but no weights.
* ``query.secagg_advertise`` -- :func:`advertise`: build the
  :class:`~fedpriv.privacy.secagg.SecAggClient` from the coordinator's setup (checked
  against the run config and the region's own threshold floor, :mod:`fedpriv.privacy.policy`),
  reply with two public keys and a seed commitment.
* ``query.secagg_share_keys`` -- :func:`share_keys`: Shamir-share the secrets among
  the neighbours, reply with the sealed share bundles (the coordinator cannot open them).
* ``query.secagg_masked_input`` -- :func:`masked_input`: open the bundles, clip to
  ``secagg-clip-range``, quantise and mask ``num_examples * update``, reply with the
  masked integer vector (nothing else: how many coordinates were clipped stays in
  the region's log). The stored update is deleted here.
* ``query.secagg_unmask`` -- :func:`unmask`: reply with the shares the coordinator
  needs to remove the masks of survivors and dropped peers (never both for one peer).
* ``query.secagg_reveal`` -- :func:`reveal`: when the coordinator says a single
  region trained (a sum of one hides nothing), hand the update over in the clear --
  only if the region's policy allows plain rounds, and never for a round in which
  the region advertised keys.

Message types, record keys and the stage records are :mod:`fedpriv.privacy.secagg.messages`'
(shared with the coordinator's workflow). Every stage function raises
:class:`~fedpriv.privacy.secagg.SecAggError`, ``ValueError`` or
:class:`~fedpriv.privacy.policy.PolicyRefusal` to refuse; :func:`handle` -- what the ClientApp
registers for every ``query.secagg_*`` message -- turns that into an error reply
(:func:`fedpriv.core.contract.error_reply`), which the coordinator treats as a dropout. Only
``numpy``, Flower records and :mod:`fedpriv.privacy.secagg` are imported here, so a secagg stage
does not pay for loading torch.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from fedpriv.core import contract
from fedpriv.core.config import FedprivConfig, SecAggSettings, check_secagg
from fedpriv.core.errors import ConfigError, FedprivError
from fedpriv.privacy.policy import PolicyRefusal, RegionPolicy, check_secagg_threshold, region_policy
from fedpriv.privacy.secagg import SecAggClient, SecAggConfig, SecAggError, SecAggProtocolError
from fedpriv.privacy.secagg.graph import neighbour_graph, share_holders
from fedpriv.privacy.secagg.messages import (ADVERTISE, MASKED, MASKED_INPUT, RECORD, REVEAL, SHARE_KEYS,
                                             TRAIN_FLAG, UNMASK, UPDATE, advertise_reply, read_keys_request,
                                             read_routed_request, read_unmask_request, shares_record, unmask_record)

# context.state keys
STATE_ROUND = "fedpriv-secagg-round"     # ConfigRecord: round, region, num-examples, rounding seed, phase
STATE_UPDATE = "fedpriv-secagg-update"   # ArrayRecord: the flat update, until it is masked (or revealed)
STATE_CLIENT = "fedpriv-secagg-client"   # ConfigRecord: SecAggClient.to_state()
STATE_SETUPS = "fedpriv-joined-setups"   # ConfigRecord: rounds this region advertised keys in (kept: never revealed)


# ------------------------------------------------------------------ helpers


def flatten_update(global_arrays: Mapping[str, np.ndarray], new_values: Mapping[str, np.ndarray]) -> np.ndarray:
    """``new - global`` for every parameter, flattened in ``global_arrays``' order (float32)."""
    missing = sorted(set(global_arrays) - set(new_values))
    if missing or len(new_values) != len(global_arrays):
        raise ValueError(f"trained values do not match the global parameters (missing {missing[:3]})")
    parts = []
    for name, g in global_arrays.items():
        g = np.asarray(g)
        v = np.asarray(new_values[name])
        if v.shape != g.shape:
            raise ValueError(f"parameter {name!r} has shape {v.shape}, the global model's is {g.shape}")
        parts.append((v.astype(np.float64) - g.astype(np.float64)).ravel())
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def clipped_count(update: np.ndarray, weight: int, max_weight: int, clip_range: float) -> int:
    """Coordinates of ``(weight / max_weight) * update`` outside ``[-clip_range, clip_range]`` (quantise clips them)."""
    scaled = np.abs(np.asarray(update, dtype=np.float64)) * (weight / max_weight)
    return int(np.count_nonzero(scaled > clip_range))


def _round_info(state: RecordDict, round_id: int, phase: str | tuple[str, ...]) -> ConfigRecord:
    info = state.config_records.get(STATE_ROUND)
    if info is None:
        raise SecAggProtocolError(f"no update kept for secure-aggregation round {round_id} (did this region train it?)")
    if int(info["round"]) != int(round_id):
        raise SecAggProtocolError(f"asked about round {round_id}, but the kept update is from round {int(info['round'])}")
    phases = (phase,) if isinstance(phase, str) else phase
    if str(info["phase"]) not in phases:
        raise SecAggProtocolError(f"round {round_id}: this stage needs phase {' or '.join(phases)}, "
                                  f"but the region is at {info['phase']!r}")
    return info


def _client(state: RecordDict) -> SecAggClient:
    saved = state.config_records.get(STATE_CLIENT)
    if saved is None:
        raise SecAggProtocolError("no secure-aggregation client state (advertise was not run here)")
    return SecAggClient.from_state(saved)


def _save(state: RecordDict, info: ConfigRecord, client: SecAggClient, phase: str) -> None:
    state[STATE_CLIENT] = ConfigRecord(client.to_state())
    info["phase"] = phase
    state[STATE_ROUND] = info


def _drop(state: RecordDict, *keys: str) -> None:
    for key in keys:
        if key in state:
            del state[key]


def forget(state: RecordDict) -> None:
    """Remove everything a secure-aggregation round kept (a new round starts from scratch)."""
    _drop(state, STATE_ROUND, STATE_UPDATE, STATE_CLIENT)


# ------------------------------------------------------------------- stages


def keep_update(state: RecordDict, round_id: int, region: str, global_arrays: Mapping[str, np.ndarray],
                new_values: Mapping[str, np.ndarray], num_examples: int, rounding_seed: int | None = None) -> None:
    """After training: keep the update (never sent in the clear) for the secagg stages of ``round_id``.

    ``rounding_seed`` (tests only) fixes the stochastic rounding; by default it is drawn from OS
    entropy, never from the run config: rounding that anyone can replay is a known offset on
    the masked update, and the rounding noise is the region's, not the coordinator's.
    """
    forget(state)
    if rounding_seed is None:
        rounding_seed = secrets.randbits(63)
    update = flatten_update(global_arrays, new_values)
    state[STATE_UPDATE] = ArrayRecord({"update": Array(update)})
    state[STATE_ROUND] = ConfigRecord({"round": int(round_id), "region": str(region), "num-examples": int(num_examples),
                                       "rounding-seed": int(rounding_seed), "phase": "trained"})


def check_setup(setup: Mapping, expected: Mapping[str, float | int]) -> None:
    """Refuse a setup outside the run config's one range (:func:`fedpriv.core.config.check_secagg`), or one
    that weakens what the run config asked for (threshold, graph, encoding)."""
    try:
        check_secagg(int(setup["threshold"]), int(setup["num_neighbours"]), float(setup["clip_range"]),
                     int(setup["quant_bits"]))
    except ConfigError as exc:
        raise SecAggProtocolError(f"the coordinator's setup: {exc}") from None
    want_t = int(expected.get("threshold", 0))
    if want_t and int(setup["threshold"]) < want_t:
        raise SecAggProtocolError(f"setup threshold {setup['threshold']} is below secagg-threshold = {want_t}")
    for key in ("num_neighbours", "quant_bits"):
        if key in expected and int(setup[key]) != int(expected[key]):
            raise SecAggProtocolError(f"setup {key} = {setup[key]} differs from the run config's {expected[key]}")
    if "clip_range" in expected and float(setup["clip_range"]) != float(expected["clip_range"]):
        raise SecAggProtocolError(f"setup clip_range = {setup['clip_range']} differs from the run config's {expected['clip_range']}")


def advertise(state: RecordDict, node_id: int, setup: ConfigRecord,
              expected: Mapping[str, float | int] | None = None, policy: RegionPolicy | None = None) -> ConfigRecord:
    """Stage 1: public keys and seed commitment (``setup`` = ``SecAggServer.setup_message()``).

    The region enforces its own threshold floor here, whatever the run config says: a
    threshold of half the share holders or fewer lets a coordinator split the holders into
    a "survived" and a "dropped" group and rebuild both secrets of one region.
    """
    info = _round_info(state, int(setup["round_id"]), "trained")
    check_setup(setup, expected or {})
    config = SecAggConfig.from_dict(setup)
    if policy is not None:
        check_secagg_threshold(policy, config.threshold, config.shares_per_client)
    if int(info["num-examples"]) > int(setup["max_weight"]):
        raise SecAggProtocolError(f"this region has {info['num-examples']} examples, more than the declared "
                                  f"max_weight = {setup['max_weight']}")
    client = SecAggClient.from_setup(node_id, setup)
    _note_setup(state, int(setup["round_id"]))
    reply = client.advertise()
    _save(state, info, client, "advertised")
    return ConfigRecord(advertise_reply(reply))


def _note_setup(state: RecordDict, round_id: int) -> None:
    """Remember (beyond :func:`forget`) that this region joined a multi-party round: it is never revealed."""
    rounds = [int(r) for r in state.config_records[STATE_SETUPS]["rounds"]] if STATE_SETUPS in state else []
    state[STATE_SETUPS] = ConfigRecord({"rounds": sorted(set(rounds[-63:]) | {int(round_id)})})


def joined_setup(state: RecordDict, round_id: int) -> bool:
    """Whether this region advertised keys for ``round_id`` (a multi-party secure-aggregation round)."""
    return STATE_SETUPS in state and int(round_id) in {int(r) for r in state.config_records[STATE_SETUPS]["rounds"]}


def share_keys(state: RecordDict, request: ConfigRecord, policy: RegionPolicy | None = None) -> ConfigRecord:
    """Stage 2: ``request`` holds everyone's public keys (``ids``, ``c_pks``, ``s_pks``, 32 bytes each).

    The threshold floor is checked again against the share holders this broadcast really gives.
    """
    info = _round_info(state, int(request["round_id"]), "advertised")
    keys = read_keys_request(request)
    client = _client(state)
    if policy is not None and client.node_id in keys:
        graph = neighbour_graph(sorted(keys), client.config.num_neighbours, client.round_seed)
        check_secagg_threshold(policy, client.config.threshold, len(share_holders(graph, client.node_id)))
    bundles = client.share_keys(keys)
    _save(state, info, client, "shared")
    return ConfigRecord(shares_record(bundles))


def masked_input(state: RecordDict, request: ConfigRecord) -> ArrayRecord:
    """Stage 3: ``request`` holds the bundles routed to this region (``"<sender id>": bytes``).

    How many coordinates were clipped stays in the region (a warning in its log): it is a
    fact about this region's single update, which secure aggregation is there to hide.
    """
    round_id = int(request["round_id"])
    info = _round_info(state, round_id, "shared")
    received = read_routed_request(request)
    client = _client(state)
    update = state.array_records[STATE_UPDATE]["update"].numpy()
    weight = int(info["num-examples"])
    cfg = client.config
    clipped = clipped_count(update, weight, cfg.max_weight, cfg.clip_range)
    if clipped:
        log(WARNING, "round %d: %d of %d update coordinates exceed secagg-clip-range = %g and are clipped",
            round_id, clipped, update.size, cfg.clip_range)
    rng = np.random.default_rng(np.random.SeedSequence([int(info["rounding-seed"]), round_id]))
    y = client.masked_input(update, received, weight, rng=rng)
    _drop(state, STATE_UPDATE)  # masked and sent: the plaintext update is no longer needed
    _save(state, info, client, "masked")
    return ArrayRecord({MASKED: Array(y)})


def unmask(state: RecordDict, request: ConfigRecord) -> ConfigRecord:
    """Stage 4: shares of the survivors' self-mask seeds and of the dropped peers' mask keys."""
    _round_info(state, int(request["round_id"]), "masked")
    client = _client(state)
    answer = client.unmask(*read_unmask_request(request))
    forget(state)  # answered once; nothing of this round is needed any more
    return ConfigRecord(unmask_record(answer))


def reveal(state: RecordDict, request: ConfigRecord, policy: RegionPolicy) -> ArrayRecord:
    """Single-region fallback: the update in the clear -- only if the policy allows plain rounds.

    The region cannot see how many others trained, so the coordinator's "you were alone"
    is taken only from a region whose policy says ``allow-plain-rounds = true``, and never
    for a round in which this region joined a multi-party setup (advertised keys).
    """
    round_id = int(request["round_id"])
    if not policy.allow_plain_rounds:
        raise PolicyRefusal("allow-plain-rounds", f"round {round_id}: asked for the update in the clear; this "
                            "region's update leaves it only masked")
    if joined_setup(state, round_id):
        raise PolicyRefusal("allow-plain-rounds", f"round {round_id}: asked for the update in the clear after this "
                            "region joined a multi-party secure-aggregation setup for that round")
    _round_info(state, round_id, "trained")
    update = state.array_records[STATE_UPDATE]["update"].numpy()
    forget(state)
    return ArrayRecord({UPDATE: Array(np.ascontiguousarray(update))})


def expected_setup(threshold: int, neighbours: int, clip_range: float, quant_bits: int) -> dict[str, float | int]:
    """The run config's secagg settings, in :class:`SecAggConfig` terms, for :func:`check_setup`."""
    return {"threshold": int(threshold), "num_neighbours": int(neighbours), "clip_range": float(clip_range),
            "quant_bits": int(quant_bits)}


# ------------------------------------------------------------------ ClientApp handler


def _advertise(state: RecordDict, rec: ConfigRecord, policy: RegionPolicy, context: Context,
               settings: SecAggSettings) -> RecordDict:
    expected = expected_setup(settings.threshold, settings.neighbours, settings.clip_range, settings.quant_bits)
    return RecordDict({RECORD: advertise(state, context.node_id, rec, expected, policy)})


_HANDLERS = {
    ADVERTISE: _advertise,
    SHARE_KEYS: lambda state, rec, policy, context, settings: RecordDict({RECORD: share_keys(state, rec, policy)}),
    MASKED_INPUT: lambda state, rec, policy, context, settings: RecordDict({MASKED: masked_input(state, rec)}),
    UNMASK: lambda state, rec, policy, context, settings: RecordDict({RECORD: unmask(state, rec)}),
    REVEAL: lambda state, rec, policy, context, settings: RecordDict({UPDATE: reveal(state, rec, policy)}),
}


def handle(msg: Message, context: Context) -> Message:
    """The ClientApp's handler of every ``query.secagg_*`` message: one stage under the region's policy.

    A refusal (the region's policy) is an error reply with code :data:`~fedpriv.core.contract.REFUSED`;
    a protocol violation, a wrong round or bad input one with :data:`~fedpriv.core.contract.FAILED`.
    The coordinator treats both as a dropout (and records the refusal).
    """
    info = context.state.config_records.get(STATE_ROUND)
    region = str(info["region"]) if info is not None else f"node-{context.node_id}"
    try:
        stage = _HANDLERS[msg.metadata.message_type]
        cfg = FedprivConfig.from_run_config(context.run_config)
        policy = region_policy(context.node_config, cfg)
        content = stage(context.state, msg.content[RECORD], policy, context, cfg.secagg)
    except PolicyRefusal as exc:
        return contract.error_reply(msg, region, str(exc), contract.POLICY)
    except (SecAggError, ValueError, KeyError, FedprivError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        return contract.error_reply(msg, region, f"secure aggregation ({msg.metadata.message_type}): {reason}")
    return Message(content=content, reply_to=msg)


__all__ = [
    "ADVERTISE", "MASKED", "MASKED_INPUT", "RECORD", "REVEAL", "SHARE_KEYS", "TRAIN_FLAG", "UNMASK", "UPDATE",
    "SecAggConfig", "advertise", "check_setup", "clipped_count", "expected_setup", "flatten_update",
    "forget", "handle", "joined_setup", "keep_update", "masked_input", "reveal", "share_keys", "unmask",
]
