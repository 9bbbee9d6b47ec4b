"""A region's half of secure aggregation: the ClientApp's secagg stage handlers, in one module.

With ``secure-aggregation = true`` a region never sends its model update in the
clear. The round runs as six message exchanges driven by the coordinator's
:class:`fedpriv.server.secagg_workflow.SecAggWorkflow`; each message may be handled by a
fresh process (as in a deployment), so everything a region must remember between
them lives in ``context.state``:

* ``train`` (the usual train message, flagged ``secagg-round``) -- the region trains
  (DP-SGD), and :func:`keep_update` stores ``update = new values - received global
  values`` (flattened in the received parameter order), its example count and a
  rounding seed *locally*. The reply carries metrics, but no weights.
* ``query.secagg_advertise`` -- :func:`advertise`: build the
  :class:`~fedpriv.privacy.secagg.SecAggClient` from the coordinator's setup (checked
  against the run config and the region's own threshold floor and ``min-secagg-peers``,
  :mod:`fedpriv.privacy.policy`), reply with two public keys, a seed commitment, the region's
  name and its identity signature over them (:mod:`fedpriv.privacy.secagg.identity`).
* ``query.secagg_share_keys`` -- :func:`share_keys`: check every advertisement of the key list
  against the region's roster (:func:`region_identity`: its own identity key and roster, never
  the run config's), then Shamir-share the secrets among the neighbours, reply with the sealed
  share bundles (the coordinator cannot open them).
* ``query.secagg_masked_input`` -- :func:`masked_input`: open the bundles, clip to
  ``secagg-clip-range``, quantise and mask ``num_examples * update``, reply with the
  masked integer vector (nothing else: how many coordinates were clipped stays in
  the region's log). The stored update is deleted here.
* ``query.secagg_consistency`` -- :func:`consistency`: sign the region's view (the key list it
  authenticated and the survivor set).
* ``query.secagg_unmask`` -- :func:`unmask`: check the survivors' signatures on that same view,
  then reply with the shares the coordinator needs to remove the masks of survivors and
  dropped peers (never both for one peer).
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
from fedpriv.privacy.policy import (PolicyRefusal, RegionPolicy, check_secagg_peers, check_secagg_threshold,
                                    node_region, region_policy)
from fedpriv.privacy.secagg import SecAggClient, SecAggConfig, SecAggError, SecAggProtocolError, identity as ident
from fedpriv.privacy.secagg.graph import neighbour_graph, share_holders
from fedpriv.privacy.secagg.identity import Advertisement, Identity, PeerAuthenticationError, RoundBinding
from fedpriv.privacy.secagg.messages import (ADVERTISE, CONSISTENCY, MASKED, MASKED_INPUT, RECORD, REVEAL,
                                             SHARE_KEYS, TRAIN_FLAG, UNMASK, UPDATE, advertise_reply,
                                             public_keys_of, read_consistency_request, read_keys_request,
                                             read_routed_request, read_unmask_request, read_view_signatures,
                                             shares_record, unmask_record, view_record)
from fedpriv.privacy.secagg.protocol import pack_ids, unpack_ids

# context.state keys
STATE_ROUND = "fedpriv-secagg-round"     # ConfigRecord: round, region, num-examples, rounding seed, phase
STATE_UPDATE = "fedpriv-secagg-update"   # ArrayRecord: the flat update, until it is masked (or revealed)
STATE_CLIENT = "fedpriv-secagg-client"   # ConfigRecord: SecAggClient.to_state()
STATE_SETUPS = "fedpriv-joined-setups"   # ConfigRecord: rounds this region advertised keys in (kept: never revealed)
STATE_VIEW = "fedpriv-secagg-view"       # ConfigRecord: the authenticated key list (ids, names, digest), survivors


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
    _drop(state, STATE_ROUND, STATE_UPDATE, STATE_CLIENT, STATE_VIEW)


def _binding(client: SecAggClient, job: str) -> RoundBinding:
    return RoundBinding(str(job), client.round_id, client.round_seed, client.config.to_dict())


def region_identity(node_config: Mapping, region: str, run_dir: str) -> Identity:
    """The identity key and roster this region authenticates its peers with -- its own, never the run config's.

    Deployment (the node config names a ``region``): node config ``identity-key-path`` and ``roster-path``
    (``fedpriv supernode --certs/--roster``); without them the region refuses to join secure aggregation.
    Simulation (the operator owns every region): what the runner wrote under the run dir.
    """
    if "region" not in node_config:
        return ident.simulation_identity(run_dir, region)
    key = str(node_config.get(ident.IDENTITY_KEY_PATH_KEY, "") or "")
    roster = str(node_config.get(ident.ROSTER_PATH_KEY, "") or "")
    if not key or not roster:
        missing, what = ((ident.ROSTER_PATH_KEY, "roster of peer identity keys") if not roster
                         else (ident.IDENTITY_KEY_PATH_KEY, "identity key"))
        raise PolicyRefusal(missing, f"region {region} has no {what}: expected node config {missing!r} (fedpriv "
                            "supernode --roster FILE; keys from `fedpriv keygen --region`); without it no peer can be "
                            "authenticated")
    return ident.load_identity(region, key, roster)


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


def advertise(state: RecordDict, node_id: int, setup: ConfigRecord, expected: Mapping[str, float | int] | None,
              policy: RegionPolicy, identity: Identity, job: str) -> ConfigRecord:
    """Stage 1: public keys and seed commitment (``setup`` = ``SecAggServer.setup_message()``), signed.

    The region enforces its own threshold floor here, whatever the run config says: a
    threshold of half the share holders or fewer lets a coordinator split the holders into
    a "survived" and a "dropped" group and rebuild both secrets of one region. A setup with
    room for fewer other regions than ``min-secagg-peers`` is refused too. The reply is signed
    with the region's identity key, bound to the job, the round, the setup and its name.
    """
    info = _round_info(state, int(setup["round_id"]), "trained")
    check_setup(setup, expected or {})
    config = SecAggConfig.from_dict(setup)
    check_secagg_threshold(policy, config.threshold, config.shares_per_client)
    check_secagg_peers(policy, config.num_clients - 1, f"round {setup['round_id']}: the setup has room for")
    # Without this region's own share, t other share holders -- all survivors, all in the sum -- rebuild its
    # self mask; t below the peer rule would let regions with looser rules unmask it in a smaller sum.
    check_secagg_peers(policy, config.threshold, f"round {setup['round_id']}: threshold t = {config.threshold} lets "
                       "the others' shares unmask this region in a sum with")
    if int(info["num-examples"]) > int(setup["max_weight"]):
        raise SecAggProtocolError(f"this region has {info['num-examples']} examples, more than the declared "
                                  f"max_weight = {setup['max_weight']}")
    client = SecAggClient.from_setup(node_id, setup)
    _note_setup(state, int(setup["round_id"]))
    reply = client.advertise()
    own = Advertisement(identity.name, reply["c_pk"], reply["s_pk"], reply["seed_commitment"])
    signature = ident.sign_advertisement(identity, _binding(client, job), client.node_id, own)
    _save(state, info, client, "advertised")
    return ConfigRecord(advertise_reply(reply, identity.name, signature))


def _note_setup(state: RecordDict, round_id: int) -> None:
    """Remember (beyond :func:`forget`) that this region joined a multi-party round: it is never revealed."""
    rounds = [int(r) for r in state.config_records[STATE_SETUPS]["rounds"]] if STATE_SETUPS in state else []
    state[STATE_SETUPS] = ConfigRecord({"rounds": sorted(set(rounds[-63:]) | {int(round_id)})})


def joined_setup(state: RecordDict, round_id: int) -> bool:
    """Whether this region advertised keys for ``round_id`` (a multi-party secure-aggregation round)."""
    return STATE_SETUPS in state and int(round_id) in {int(r) for r in state.config_records[STATE_SETUPS]["rounds"]}


def share_keys(state: RecordDict, request: ConfigRecord, policy: RegionPolicy, identity: Identity,
               job: str) -> ConfigRecord:
    """Stage 2: ``request`` holds everyone's signed advertisements (:func:`~fedpriv.privacy.secagg.messages.keys_request`).

    Before sharing anything the region checks every advertisement against its roster (unknown
    region, a key not the region's, another job's or round's advertisement, a name or key twice:
    refused), counts the authenticated other regions against ``min-secagg-peers``, and checks
    its threshold floor against the share holders this broadcast really gives.
    """
    info = _round_info(state, int(request["round_id"]), "advertised")
    entries = read_keys_request(request)
    client = _client(state)
    binding = _binding(client, job)
    mine = client.advertised_keys()
    own = Advertisement(identity.name, mine["c_pk"], mine["s_pk"], mine["seed_commitment"])
    others = ident.verify_key_list(identity, binding, client.node_id, entries, own)
    check_secagg_peers(policy, len(others), f"round {client.round_id}: the key list holds")
    graph = neighbour_graph(sorted(entries), client.config.num_neighbours, client.round_seed)
    check_secagg_threshold(policy, client.config.threshold, len(share_holders(graph, client.node_id)))
    bundles = client.share_keys(public_keys_of(entries))
    ids = sorted(entries)
    state[STATE_VIEW] = ConfigRecord({"ids": pack_ids(ids), "names": [entries[i].region for i in ids],
                                      "digest": ident.key_list_digest(binding, entries)})
    _save(state, info, client, "shared")
    return ConfigRecord(shares_record(bundles))


def _view(state: RecordDict) -> ConfigRecord:
    view = state.config_records.get(STATE_VIEW)
    if view is None:
        raise SecAggProtocolError("no authenticated key list kept (share-keys was not run here)")
    return view


def masked_input(state: RecordDict, request: ConfigRecord, policy: RegionPolicy) -> ArrayRecord:
    """Stage 3: ``request`` holds the bundles routed to this region (``"<sender id>": bytes``).

    How many coordinates were clipped stays in the region (a warning in its log): it is a
    fact about this region's single update, which secure aggregation is there to hide. The
    bundles come from peers whose keys were authenticated at share-keys (AES-GCM under their
    key agreement); fewer of them than ``min-secagg-peers`` and nothing masked leaves.
    """
    round_id = int(request["round_id"])
    info = _round_info(state, round_id, "shared")
    received = read_routed_request(request)
    client = _client(state)
    check_secagg_peers(policy, len(set(received) - {client.node_id}),
                       f"round {round_id}: share bundles (pairwise masks) arrived from")
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


def consistency(state: RecordDict, request: ConfigRecord, policy: RegionPolicy, identity: Identity,
                job: str) -> ConfigRecord:
    """Consistency stage: sign this region's view -- the key list it saw and the survivor set.

    The survivors are the regions whose masked inputs are in the sum; the region refuses a set
    that omits it, names a region not in its key list, or holds fewer other regions than
    ``min-secagg-peers`` (or fewer than the threshold).
    """
    round_id = int(request["round_id"])
    info = _round_info(state, round_id, "masked")
    client = _client(state)
    view = _view(state)
    survivors = read_consistency_request(request)
    known = set(unpack_ids(bytes(view["ids"])))
    if len(set(survivors)) != len(survivors) or client.node_id not in survivors or not set(survivors) <= known:
        raise SecAggProtocolError(f"round {round_id}: the survivor set must name this region once and only regions "
                                  "of the key list it authenticated")
    check_secagg_peers(policy, len(survivors) - 1, f"round {round_id}: the survivor set holds")
    if len(survivors) < client.config.threshold:
        raise SecAggProtocolError(f"round {round_id}: {len(survivors)} survivors; threshold is {client.config.threshold}")
    signature = identity.sign(ident.view_message(_binding(client, job), bytes(view["digest"]), survivors))
    view["survivors"] = pack_ids(sorted(survivors))
    state[STATE_VIEW] = view
    info["phase"] = "consistent"
    state[STATE_ROUND] = info
    return ConfigRecord(view_record(signature))


def unmask(state: RecordDict, request: ConfigRecord, identity: Identity, job: str) -> ConfigRecord:
    """Stage 4: shares of the survivors' self-mask seeds and of the dropped peers' mask keys.

    Only after the survivors' signatures on this region's own view check out (every one from a
    survivor, on the same key list and survivor set, at least the threshold's worth), and only
    for a request that agrees with that survivor set.
    """
    _round_info(state, int(request["round_id"]), "consistent")
    client = _client(state)
    view = _view(state)
    alive = unpack_ids(bytes(view["survivors"]))
    names = dict(zip(unpack_ids(bytes(view["ids"])), [str(n) for n in view["names"]]))
    ident.verify_view_signatures(identity, _binding(client, job), bytes(view["digest"]), alive, names,
                                 read_view_signatures(request), client.config.threshold)
    survivors, dropped = read_unmask_request(request)
    if not set(survivors) <= set(alive) or set(dropped) & set(alive):
        raise PeerAuthenticationError(f"round {client.round_id}: the unmask request disagrees with the survivor set "
                                      "every signer confirmed")
    answer = client.unmask(survivors, dropped)
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
               settings: SecAggSettings, identity: Identity, job: str) -> RecordDict:
    expected = expected_setup(settings.threshold, settings.neighbours, settings.clip_range, settings.quant_bits)
    return RecordDict({RECORD: advertise(state, context.node_id, rec, expected, policy, identity, job)})


_HANDLERS = {
    ADVERTISE: _advertise,
    SHARE_KEYS: lambda state, rec, policy, context, settings, identity, job:
        RecordDict({RECORD: share_keys(state, rec, policy, identity, job)}),
    MASKED_INPUT: lambda state, rec, policy, context, settings, identity, job:
        RecordDict({MASKED: masked_input(state, rec, policy)}),
    CONSISTENCY: lambda state, rec, policy, context, settings, identity, job:
        RecordDict({RECORD: consistency(state, rec, policy, identity, job)}),
    UNMASK: lambda state, rec, policy, context, settings, identity, job:
        RecordDict({RECORD: unmask(state, rec, identity, job)}),
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
        cfg = FedprivConfig.from_run_config(context.run_config)
        policy = region_policy(context.node_config, cfg)
        if msg.metadata.message_type == REVEAL:
            content = RecordDict({UPDATE: reveal(context.state, msg.content[RECORD], policy)})
        else:
            stage = _HANDLERS[msg.metadata.message_type]
            identity = region_identity(context.node_config, node_region(context.node_config, cfg)[0], cfg.run_dir)
            job = cfg.job_id or str(context.run_id)
            content = stage(context.state, msg.content[RECORD], policy, context, cfg.secagg, identity, job)
    except PolicyRefusal as exc:
        return contract.error_reply(msg, region, str(exc), contract.POLICY)
    except PeerAuthenticationError as exc:  # the region's roster: a refusal, like its policy's
        return contract.error_reply(msg, region, f"roster: {exc}", contract.POLICY)
    except ident.IdentityError as exc:
        return contract.error_reply(msg, region, f"secure aggregation: {exc}")
    except (SecAggError, ValueError, KeyError, FedprivError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        return contract.error_reply(msg, region, f"secure aggregation ({msg.metadata.message_type}): {reason}")
    return Message(content=content, reply_to=msg)


__all__ = [
    "ADVERTISE", "CONSISTENCY", "MASKED", "MASKED_INPUT", "RECORD", "REVEAL", "SHARE_KEYS", "TRAIN_FLAG", "UNMASK",
    "UPDATE", "SecAggConfig", "advertise", "check_setup", "clipped_count", "consistency", "expected_setup",
    "flatten_update", "forget", "handle", "joined_setup", "keep_update", "masked_input", "region_identity", "reveal",
    "share_keys", "unmask",
]
