"""The coordinator as an attacker against secure aggregation (issue 9, finding 4).

Through the real ClientApp secagg handlers of regions that each enforce their own policy:
the update is never handed over in the clear when the policy forbids plain rounds or the
region joined a multi-party setup, and a Shamir threshold that lets the coordinator split
the share holders is refused at setup.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from adversary_support import REGIONS, Region, global_arrays, refusal, run_config, shard_root, task_identity  # noqa: F401 (fixtures)
from fedpriv.client import secure_aggregation as secagg
from fedpriv.core import contract
from fedpriv.privacy.secagg import messages
from fedpriv.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer, crypto, shamir


def _setup(n: int, t: int, round_id: int = 1) -> ConfigRecord:
    config = SecAggConfig(num_clients=n, threshold=t, clip_range=8.0, quant_bits=22, max_weight=1000)
    return ConfigRecord(messages.setup_record(SecAggServer(config, round_id=round_id).setup_message()))


def test_reveal_is_refused_when_two_regions_trained(tmp_path, shard_root):
    """Both regions trained round 1; the coordinator tells each "you were alone" and asks for the update."""
    run = run_config(shard_root, tmp_path / "run")
    regions = [Region(name, shard_root, tmp_path / "regions", run) for name in REGIONS[:2]]
    arrays = global_arrays(run)
    for region in regions:
        assert not region.train(arrays).has_error()
    for region in regions:
        err = refusal(region.stage(messages.REVEAL, ConfigRecord({"round_id": 1})))
        assert err.kind == contract.POLICY and err.text.startswith("allow-plain-rounds:")
        assert secagg.STATE_UPDATE in region.context.state  # still only leaves masked


def test_reveal_is_refused_after_the_region_joined_a_setup_even_where_plain_rounds_are_allowed(tmp_path, shard_root):
    run = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "regions", run, **{"allow-plain-rounds": True})
    assert not region.train(global_arrays(run)).has_error()
    assert not region.stage(messages.ADVERTISE, _setup(n=3, t=2)).has_error()
    err = refusal(region.stage(messages.REVEAL, ConfigRecord({"round_id": 1})))
    assert "joined a multi-party" in err.text
    assert secagg.STATE_UPDATE in region.context.state  # kept for its masked input; never returned in the clear


def test_reveal_works_for_a_lone_region_whose_policy_allows_plain_rounds(tmp_path, shard_root):
    run = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "regions", run, **{"allow-plain-rounds": True})
    assert not region.train(global_arrays(run)).has_error()
    reply = region.stage(messages.REVEAL, ConfigRecord({"round_id": 1}))
    assert not reply.has_error() and reply.content[messages.UPDATE][messages.UPDATE].numpy().size > 0


def test_the_split_threshold_attack_works_on_the_bare_protocol():
    """The premise: t = 2 of 4 holders; "v survived" to {v, a}, "v dropped" to {b, c} rebuilds both of v's secrets."""
    config = SecAggConfig(num_clients=4, threshold=2, clip_range=8.0, quant_bits=22, max_weight=10)
    server = SecAggServer(config, round_id=1)
    ids = [11, 12, 13, 14]
    clients = {i: SecAggClient.from_setup(i, server.setup_message()) for i in ids}
    adverts = {i: c.advertise() for i, c in clients.items()}
    keys = server.collect_advertisements(adverts)
    routed = server.route_shares({i: c.share_keys(keys) for i, c in clients.items()})
    for i, c in clients.items():
        c.masked_input(np.zeros(3), routed[i], weight=1)
    v, a, b, c = ids
    seed_shares = [clients[x].unmask(survivors=[v, a], dropped=[])["seed_shares"][v] for x in (v, a)]
    key_shares = [clients[x].unmask(survivors=[b, c], dropped=[v])["key_shares"][v] for x in (b, c)]
    seed, s_sk = shamir.combine(seed_shares, 2), shamir.combine(key_shares, 2)
    ctx = crypto.round_context(1, server.setup_message()["round_seed"])
    assert crypto.seed_commitment(seed, ctx, v) == adverts[v]["seed_commitment"]  # v's self mask ...
    assert crypto.public_from_private(s_sk) == adverts[v]["s_pk"]                 # ... and its pairwise masks


@pytest.mark.parametrize("n, t", [(4, 2), (3, 2)])
def test_a_setup_whose_threshold_lets_holders_be_split_is_refused_at_setup(tmp_path, shard_root, n, t):
    """secagg-threshold = 2 with 4 regions: the run config agrees, but every region refuses to advertise."""
    run = run_config(shard_root, tmp_path / "run", **{"secagg-threshold": 2})
    regions = [Region(name, shard_root, tmp_path / "regions", run) for name in REGIONS[:n]]
    g = {"w": np.zeros(4, np.float32)}
    for region in regions:
        secagg.keep_update(region.context.state, 1, region.name, g, {"w": np.ones(4, np.float32)}, 64)
    replies = [region.stage(messages.ADVERTISE, _setup(n=n, t=t)) for region in regions]
    if t * 2 > n:  # a strict majority of the holders: accepted
        assert not any(r.has_error() for r in replies)
        return
    for region, reply in zip(regions, replies):
        err = refusal(reply)
        assert err.text.startswith("min-secagg-threshold:") and f"t = {t} for {n} share holders" in err.text
        assert region.context.state.config_records[secagg.STATE_ROUND]["phase"] == "trained"  # no keys advertised


def test_a_region_with_a_higher_floor_refuses_the_coordinators_majority(tmp_path, shard_root):
    run = run_config(shard_root, tmp_path / "run")
    region = Region("us-east", shard_root, tmp_path / "regions", run, **{"min-secagg-threshold": 0.75})
    secagg.keep_update(region.context.state, 1, region.name, {"w": np.zeros(2)}, {"w": np.ones(2)}, 64)
    err = refusal(region.stage(messages.ADVERTISE, _setup(n=4, t=3)))  # 3 of 4 is a majority, not > 3/4
    assert "needs t >= 4" in err.text
