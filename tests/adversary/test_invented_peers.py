"""The coordinator as an attacker against secure aggregation's peers (issue 21, item 2).

A region checks the Shamir threshold only against the share holders the coordinator announces;
before peer authentication nothing said who those holders were. With "regions" of its own
making -- real regions' names and node ids, keys it generated -- the coordinator held every share
and unmasked the victim's update alone. Here, through the real ClientApp secagg handlers of
regions that each hold their own identity key and roster:

* invented peers (n = 2 and n = 3; real names, coordinator-made keys; or a name not in the
  roster) are refused at share-keys, before anything masked leaves the region;
* a correctly signed advertisement replayed from another round or another job is refused;
* split views -- of the key list or of the survivor set -- are detected at unmask and refused;
* fewer authenticated peers than ``min-secagg-peers`` is refused before masked input;
* the honest path still gives plain FedAvg of the survivors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord

from adversary_support import NODE_BASE, REGIONS, Region, refusal, run_config, shard_root, task_identity  # noqa: F401 (fixtures)
from fedpriv.client import secure_aggregation as secagg
from fedpriv.core import contract
from fedpriv.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer, messages, pack_ids
from fedpriv.privacy.secagg.identity import Advertisement, RoundBinding, advertisement_message

VICTIM = "us-east"


def _config(n: int) -> SecAggConfig:
    return SecAggConfig(num_clients=n, threshold=2, clip_range=8.0, quant_bits=22, max_weight=1000)


def _update(i: int) -> np.ndarray:
    return np.random.default_rng([i, 21]).normal(0.0, 0.2, 24).astype(np.float32)


def _trained(regions: list[Region], rnd: int) -> None:
    """What the train handler keeps after training round ``rnd`` (the update stays in the region)."""
    for i, region in enumerate(regions):
        secagg.keep_update(region.context.state, rnd, region.name, {"w": np.zeros(24, np.float32)},
                           {"w": _update(i)}, 64 + 8 * i)


def _ok(reply):
    assert not reply.has_error(), reply.error.reason
    return reply


def _phase(region: Region) -> str:
    return str(region.context.state.config_records[secagg.STATE_ROUND]["phase"])


def _still_unmasked(region: Region) -> bool:
    """The region's update is still only in the region: it never produced a masked input."""
    return secagg.STATE_UPDATE in region.context.state and _phase(region) in ("trained", "advertised", "shared")


def _keys_record(rnd: int, adverts: dict[int, dict]) -> ConfigRecord:
    """The key-list broadcast, written field by field as a coordinator would (any content it likes)."""
    ids = sorted(adverts)
    return ConfigRecord({"round_id": rnd, "ids": pack_ids(ids),
                         "c_pks": b"".join(bytes(adverts[i]["c_pk"]) for i in ids),
                         "s_pks": b"".join(bytes(adverts[i]["s_pk"]) for i in ids),
                         "commitments": b"".join(bytes(adverts[i]["seed_commitment"]) for i in ids),
                         "signatures": b"".join(bytes(adverts[i].get("signature", b"\0" * 64)) for i in ids),
                         "regions": [str(adverts[i].get("region", "")) for i in ids]})


def _regions(tmp_path, shard_root, names=REGIONS[:3], job="job-1", **policy) -> list[Region]:
    run = run_config(shard_root, tmp_path / "run", **{"job-id": job})
    return [Region(name, shard_root, tmp_path / "regions", run, **policy) for name in names]


# ------------------------------------------------------------------ the premise


def test_invented_peers_recover_one_update_on_the_unauthenticated_protocol():
    """The attack itself: the victim plus two coordinator-made clients (n = 3, t = 2) -> its update, exactly."""
    config = _config(3)
    server = SecAggServer(config, round_id=1, vector_size=24)
    victim, fakes = SecAggClient.from_setup(11, server.setup_message()), [
        SecAggClient.from_setup(i, server.setup_message()) for i in (12, 13)]
    adverts = {11: victim.advertise(), **{f.node_id: f.advertise() for f in fakes}}
    keys = server.collect_advertisements(adverts)
    routed = server.route_shares({c.node_id: c.share_keys(keys) for c in (victim, *fakes)})
    x = _update(0)
    masked = {11: victim.masked_input(x, routed[11], weight=100)}
    masked.update({f.node_id: f.masked_input(np.zeros(24), routed[f.node_id], weight=0) for f in fakes})
    requests = server.collect_masked_inputs(masked)
    answers = {c.node_id: c.unmask(requests[c.node_id]["survivors"], requests[c.node_id]["dropped"])
               for c in (victim, *fakes)}
    result = server.unmask(answers)
    assert result.total_weight == 100  # the victim's exact N ...
    assert np.corrcoef(result.average, x)[0, 1] > 0.999999  # ... and its update
    assert np.max(np.abs(result.average - x)) <= result.error_bound


# ------------------------------------------------------------ invented peers


def _forged_adverts(setup: dict, config: SecAggConfig, names: list[str], node_ids: list[int], job: str,
                    how: str) -> dict[int, dict]:
    """Coordinator-made advertisements: its own keys, real regions' names and ids, signed with its own key."""
    forger = Ed25519PrivateKey.generate()
    out = {}
    for name, nid in zip(names, node_ids):
        ad = SecAggClient.from_setup(nid, setup).advertise()
        binding = RoundBinding(job, int(setup["round_id"]), bytes(setup["round_seed"]), config.to_dict())
        msg = advertisement_message(binding, nid, Advertisement(name, ad["c_pk"], ad["s_pk"], ad["seed_commitment"]))
        signature = {"coordinator-key": forger.sign(msg), "no-signature": b"\0" * 64}[how]
        out[nid] = {**ad, "region": name, "signature": signature}
    return out


@pytest.mark.parametrize("how", ["coordinator-key", "no-signature"])
@pytest.mark.parametrize("fakes", [["eu-west"], ["eu-west", "ap-south"], ["mallory", "eve"]])
def test_invented_peers_are_refused_before_anything_masked_leaves(tmp_path, shard_root, fakes, how):
    """Victim + 1 or 2 coordinator-made "regions" (real names and node ids, or names outside the roster)."""
    (victim,) = _regions(tmp_path, shard_root, [VICTIM])
    _trained([victim], 1)
    config = _config(1 + len(fakes))
    setup = SecAggServer(config, round_id=1).setup_message()
    reply = _ok(victim.stage(messages.ADVERTISE, ConfigRecord(messages.setup_record(setup))))
    ids = [NODE_BASE + 977 * (REGIONS.index(n) if n in REGIONS else 10 + k) for k, n in enumerate(fakes)]
    adverts = {victim.node_id: dict(reply.content[messages.RECORD]),
               **_forged_adverts(setup, config, fakes, ids, "job-1", how)}
    err = refusal(victim.stage(messages.SHARE_KEYS, _keys_record(1, adverts)))
    assert err.text.startswith("roster:") and ("does not verify" in err.text or "not in this region's roster" in err.text)
    assert _phase(victim) == "advertised" and _still_unmasked(victim)  # no share bundle, no masked input


# ------------------------------------------------------------- honest helpers


def _advertise(regions: list[Region], rnd: int, config: SecAggConfig, server: SecAggServer | None = None):
    server = server or SecAggServer(config, round_id=rnd, vector_size=24)
    setup = ConfigRecord(messages.setup_record(server.setup_message()))
    adverts = {r.node_id: dict(_ok(r.stage(messages.ADVERTISE, setup, rnd)).content[messages.RECORD]) for r in regions}
    return server, adverts


def _share(regions: list[Region], rnd: int, key_lists: dict[int, ConfigRecord]) -> dict[int, dict[int, bytes]]:
    """Each region's share reply to its own key list; returns the coordinator's routing ``{receiver: {sender: bundle}}``."""
    sent = {r.node_id: messages.shares_reply(_ok(r.stage(messages.SHARE_KEYS, key_lists[r.node_id], rnd))
                                             .content[messages.RECORD]) for r in regions}
    return {w.node_id: {u: out[w.node_id] for u, out in sent.items() if w.node_id in out} for w in regions}


def _mask(regions: list[Region], rnd: int, inbox: dict[int, dict[int, bytes]]) -> dict[int, np.ndarray]:
    return {r.node_id: _ok(r.stage(messages.MASKED_INPUT, ConfigRecord(messages.routed_request(rnd, inbox[r.node_id])),
                                   rnd)).content[messages.MASKED][messages.MASKED].numpy() for r in regions}


def _sign_view(region: Region, rnd: int, survivors: list[int]) -> bytes:
    reply = _ok(region.stage(messages.CONSISTENCY, ConfigRecord(messages.consistency_request(rnd, survivors)), rnd))
    return messages.read_view_record(reply.content[messages.RECORD])


def _rosters_of_the_others(regions: list[Region]) -> None:
    """Each region's roster lists only the *other* regions, as README's deployment has regions write it."""
    for region in regions:
        shared = Path(region.context.node_config["roster-path"])
        own = [line for line in shared.read_text().splitlines() if line.split(" ", 1)[0] != region.name]
        mine = shared.with_name(f"roster-of-{region.name}.txt")
        mine.write_text("\n".join(own) + "\n")
        region.context.node_config["roster-path"] = str(mine)


@pytest.mark.parametrize("rosters", ["every region", "the other regions"])
def test_the_honest_path_with_authenticated_peers_is_plain_fedavg(tmp_path, shard_root, rosters):
    regions = _regions(tmp_path, shard_root)
    if rosters == "the other regions":  # a region's own signature on its view is checked with its own key
        _rosters_of_the_others(regions)
    _trained(regions, 1)
    server, adverts = _advertise(regions, 1, _config(3))
    keys = ConfigRecord(messages.keys_request(1, server.collect_advertisements(adverts), adverts))
    routed = server.route_shares({r.node_id: messages.shares_reply(_ok(r.stage(messages.SHARE_KEYS, keys)).content[
        messages.RECORD]) for r in regions})
    requests = server.collect_masked_inputs(_mask(regions, 1, routed))
    views = {r.node_id: _sign_view(r, 1, sorted(requests)) for r in regions}
    answers = {r.node_id: messages.unmask_reply(_ok(r.stage(messages.UNMASK, ConfigRecord(messages.unmask_request(
        1, requests[r.node_id]["survivors"], requests[r.node_id]["dropped"], views)))).content[messages.RECORD])
        for r in regions}
    result = server.unmask(answers)
    weights = [64 + 8 * i for i in range(3)]
    plain = sum(w * _update(i).astype(np.float64) for i, w in enumerate(weights)) / sum(weights)
    assert result.total_weight == sum(weights)
    assert np.max(np.abs(result.average - plain)) <= result.error_bound


# ------------------------------------------------------------------- replays


@pytest.mark.parametrize("other", ["round", "job"])
def test_a_correctly_signed_advertisement_replayed_from_another_round_or_job_is_refused(tmp_path, shard_root, other):
    """eu-west's genuine, correctly signed advertisement of round 1 (or of another job) in the victim's key list."""
    old_regions = _regions(tmp_path, shard_root, job="job-0" if other == "job" else "job-1")
    _trained(old_regions, 1)
    _, old = _advertise(old_regions, 1, _config(3))
    rnd = 2 if other == "round" else 1
    regions = _regions(tmp_path, shard_root) if other == "job" else old_regions
    _trained(regions, rnd)
    _, adverts = _advertise(regions, rnd, _config(3))
    eu = regions[REGIONS.index("eu-west")].node_id
    adverts[eu] = old[eu]  # the replay
    victim = regions[REGIONS.index(VICTIM)]
    err = refusal(victim.stage(messages.SHARE_KEYS, _keys_record(rnd, adverts), rnd))
    assert err.text.startswith("roster:") and f"advertisement of node {eu}" in err.text and "does not verify" in err.text
    assert _still_unmasked(victim)


def test_a_key_list_naming_one_region_twice_is_refused(tmp_path, shard_root):
    regions = _regions(tmp_path, shard_root)
    _trained(regions, 1)
    _, adverts = _advertise(regions, 1, _config(3))
    victim, eu, ap = (regions[REGIONS.index(n)] for n in (VICTIM, "eu-west", "ap-south"))
    adverts[ap.node_id] = {**adverts[eu.node_id]}  # eu-west's genuine advertisement again, under another node id
    err = refusal(victim.stage(messages.SHARE_KEYS, _keys_record(1, adverts)))
    assert "names region 'eu-west' twice" in err.text and _still_unmasked(victim)


# ---------------------------------------------------------------- split views


def _masked_round(regions: list[Region], key_lists: dict[int, ConfigRecord]) -> None:
    inbox = _share(regions, 1, key_lists)
    _mask(regions, 1, inbox)


def test_split_views_of_the_survivor_set_are_refused_at_unmask(tmp_path, shard_root):
    """The victim is told all three survived; the others that it dropped. Their signatures do not cover its view."""
    regions = _regions(tmp_path, shard_root)
    _trained(regions, 1)
    server, adverts = _advertise(regions, 1, _config(3))
    keys = ConfigRecord(messages.keys_request(1, server.collect_advertisements(adverts), adverts))
    _masked_round(regions, {r.node_id: keys for r in regions})
    victim, others = regions[0], regions[1:]
    everyone = sorted(r.node_id for r in regions)
    views = {victim.node_id: _sign_view(victim, 1, everyone)}
    views.update({r.node_id: _sign_view(r, 1, sorted(o.node_id for o in others)) for r in others})
    request = messages.unmask_request(1, everyone, [], views)
    err = refusal(victim.stage(messages.UNMASK, ConfigRecord(request)))
    assert err.text.startswith("roster:") and "survivor-set view" in err.text and "does not verify" in err.text
    # ... and leaving the others' signatures out is no better: too few confirmed the victim's view.
    err = refusal(victim.stage(messages.UNMASK, ConfigRecord(messages.unmask_request(
        1, everyone, [], {victim.node_id: views[victim.node_id]}))))
    assert "only 1 survivors confirmed" in err.text
    assert _phase(victim) == "consistent"  # no share of anything left the victim


def test_split_views_of_the_key_list_are_refused_at_unmask(tmp_path, shard_root):
    """us-east is shown a key list without the victim (ap-south); the victim and eu-west the full one."""
    regions = _regions(tmp_path, shard_root)
    _trained(regions, 1)
    server, adverts = _advertise(regions, 1, _config(3))
    us, eu, victim = regions
    full = ConfigRecord(messages.keys_request(1, server.collect_advertisements(adverts), adverts))
    partial = _keys_record(1, {nid: ad for nid, ad in adverts.items() if nid != victim.node_id})
    inbox = _share(regions, 1, {victim.node_id: full, eu.node_id: full, us.node_id: partial})
    inbox[us.node_id].pop(victim.node_id)  # us-east would not open a bundle from a region it never saw
    _mask(regions, 1, inbox)
    everyone = sorted(r.node_id for r in regions)
    views = {r.node_id: _sign_view(r, 1, everyone) for r in (victim, eu)}
    views[us.node_id] = _sign_view(us, 1, [us.node_id, eu.node_id])  # all us-east can sign: its own list
    err = refusal(victim.stage(messages.UNMASK, ConfigRecord(messages.unmask_request(1, everyone, [], views))))
    assert err.text.startswith("roster:") and f"view of node {us.node_id}" in err.text
    assert _phase(victim) == "consistent"  # no share of anything left the victim


def test_a_survivor_set_beyond_the_authenticated_key_list_is_refused(tmp_path, shard_root):
    regions = _regions(tmp_path, shard_root)
    _trained(regions, 1)
    server, adverts = _advertise(regions, 1, _config(3))
    us, eu, ap = regions
    partial = _keys_record(1, {nid: ad for nid, ad in adverts.items() if nid != ap.node_id})
    inbox = _share([us, eu], 1, {us.node_id: partial, eu.node_id: partial})
    _mask([us, eu], 1, inbox)
    reply = us.stage(messages.CONSISTENCY, ConfigRecord(messages.consistency_request(1, sorted(adverts))))
    assert reply.has_error() and "only regions of the key list" in reply.error.reason


# ------------------------------------------------------------ min-secagg-peers


def test_a_setup_with_room_for_fewer_peers_than_min_secagg_peers_is_refused_at_advertise(tmp_path, shard_root):
    (victim,) = _regions(tmp_path, shard_root, [VICTIM], **{"min-secagg-peers": 2})
    _trained([victim], 1)
    setup = ConfigRecord(messages.setup_record(SecAggServer(_config(2), round_id=1).setup_message()))
    err = refusal(victim.stage(messages.ADVERTISE, setup))
    assert err.text.startswith("min-secagg-peers:") and "needs at least 2" in err.text
    assert len(err.text.splitlines()) == 1 and _phase(victim) == "trained"  # no keys even advertised


def test_a_threshold_below_min_secagg_peers_is_refused_at_advertise(tmp_path, shard_root):
    """6 regions, t = 4: without the victim's own share, 4 other survivors rebuild its self mask -- 4 < 5 peers."""
    (victim,) = _regions(tmp_path, shard_root, [VICTIM], **{"min-secagg-peers": 5})

    def setup(t: int) -> ConfigRecord:
        config = SecAggConfig(num_clients=6, threshold=t, clip_range=8.0, quant_bits=22, max_weight=1000)
        return ConfigRecord(messages.setup_record(SecAggServer(config, round_id=1).setup_message()))

    _trained([victim], 1)
    err = refusal(victim.stage(messages.ADVERTISE, setup(4)))  # a strict majority of 6 holders, yet below the rule
    assert err.text.startswith("min-secagg-peers:") and "threshold t = 4" in err.text and _phase(victim) == "trained"
    assert not victim.stage(messages.ADVERTISE, setup(5)).has_error()  # t = 5 others needed: accepted


def test_a_key_list_with_fewer_authenticated_peers_than_min_secagg_peers_is_refused(tmp_path, shard_root):
    """n = 3 announced, only one real peer in the key list: the victim (min-secagg-peers = 2) shares nothing."""
    regions = _regions(tmp_path, shard_root, **{"min-secagg-peers": 2})
    _trained(regions, 1)
    _, adverts = _advertise(regions, 1, _config(3))
    victim = regions[0]
    del adverts[regions[2].node_id]
    err = refusal(victim.stage(messages.SHARE_KEYS, _keys_record(1, adverts)))
    assert err.text.startswith("min-secagg-peers:") and "the key list holds 1 authenticated" in err.text
    assert _still_unmasked(victim)


def test_bundles_from_fewer_peers_than_min_secagg_peers_are_refused_before_masked_input(tmp_path, shard_root):
    """All three shared keys, but the coordinator routes the victim only one peer's bundle."""
    regions = _regions(tmp_path, shard_root, **{"min-secagg-peers": 2})
    _trained(regions, 1)
    server, adverts = _advertise(regions, 1, _config(3))
    keys = ConfigRecord(messages.keys_request(1, server.collect_advertisements(adverts), adverts))
    inbox = _share(regions, 1, {r.node_id: keys for r in regions})
    victim = regions[0]
    inbox[victim.node_id].pop(regions[2].node_id)
    err = refusal(victim.stage(messages.MASKED_INPUT, ConfigRecord(messages.routed_request(1, inbox[victim.node_id]))))
    assert err.text.startswith("min-secagg-peers:") and "arrived from 1 authenticated" in err.text
    assert _still_unmasked(victim)


def test_a_deployed_region_without_a_roster_refuses_to_join(tmp_path, shard_root):
    (victim,) = _regions(tmp_path, shard_root, [VICTIM])
    del victim.context.node_config["roster-path"]
    _trained([victim], 1)
    setup = ConfigRecord(messages.setup_record(SecAggServer(_config(3), round_id=1).setup_message()))
    err = refusal(victim.stage(messages.ADVERTISE, setup))
    assert err.text.startswith("roster-path:") and err.kind == contract.POLICY
