"""The pieces secure aggregation is composed of, one at a time and without Flower processes.

* :class:`fedpriv.server.secagg_workflow.SecAggWorkflow` drives a round over a fake grid whose
  regions are the real ClientApp (:func:`fedpriv.client.secure_aggregation.handle`), with a
  dropout -- no strategy involved -- and its average equals plain FedAvg of the survivors;
* :mod:`fedpriv.server.transport` waits no longer than its deadline and names every missing node;
* :mod:`fedpriv.privacy.secagg.messages` is what both sides speak: its encoders and readers round-trip;
* the one range of ``secagg-quant-bits`` (:mod:`fedpriv.core.config`) is enforced on the run
  config, on the workflow's settings, and by a region on a coordinator's setup.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from conftest import fixed_task_identity
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto

from fedpriv.client import secure_aggregation as secagg
from fedpriv.client.app import app as client_app
from fedpriv.core.config import SECAGG_QUANT_BITS, FedprivConfig, SecAggSettings, resolve_config
from fedpriv.core.errors import ConfigError
from fedpriv.privacy.secagg import SecAggConfig, SecAggProtocolError, SecAggServer
from fedpriv.privacy.secagg import messages
from fedpriv.privacy.policy import RegionPolicy
from fedpriv.privacy.secagg.identity import simulation_identity, write_simulation_identities
from fedpriv.server import transport
from fedpriv.server.secagg_workflow import SecAggWorkflow

NODE = 1 << 62


@pytest.fixture(autouse=True)
def _task_identity():
    with fixed_task_identity():
        yield


class StageGrid:
    """push/pull like Flower's Grid; every message goes to the real ClientApp; ``silent`` nodes never answer."""

    def __init__(self, run_config: dict, n: int):
        self.contexts = {NODE + i: Context(run_id=7, node_id=NODE + i, node_config={"partition-id": i},
                                           state=RecordDict(), run_config=dict(run_config)) for i in range(n)}
        self.silent: dict[str, set[int]] = {}
        self.pulls = 0
        self._outbox: dict[str, Message] = {}

    def push_messages(self, messages_):
        ids = []
        for msg in messages_:
            msg.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            ids.append(mid)
            if msg.metadata.dst_node_id in self.silent.get(msg.metadata.message_type, set()):
                continue
            ctx = self.contexts[msg.metadata.dst_node_id]
            ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))  # a fresh process per message
            self._outbox[mid] = message_from_proto(message_to_proto(client_app(message_from_proto(message_to_proto(msg)), ctx)))
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self._outbox.pop(m) for m in list(message_ids) if m in self._outbox]


def _update(i: int) -> np.ndarray:
    return np.random.default_rng([i, 99]).normal(0.0, 0.3, 40).astype(np.float32)


def _examples(i: int) -> int:
    return 50 + 11 * i


def _trained_grid(tmp_path, n: int, rnd: int) -> StageGrid:
    flat, _ = resolve_config({"regions": ",".join(f"r{i}" for i in range(n)), "run-dir": str(tmp_path)})
    write_simulation_identities(tmp_path, [f"r{i}" for i in range(n)])  # what the simulation runner does
    grid = StageGrid(flat, n)
    for i, (nid, ctx) in enumerate(grid.contexts.items()):  # what the train handler keeps after training
        zeros = {"w": np.zeros(40, np.float32)}
        secagg.keep_update(ctx.state, rnd, f"r{i}", zeros, {"w": _update(i)}, _examples(i))
    return grid


def test_the_workflow_alone_drives_a_round_with_a_dropout_and_gives_plain_fedavg_of_the_survivors(tmp_path):
    n, rnd = 4, 3
    grid = _trained_grid(tmp_path, n, rnd)
    grid.silent[messages.MASKED_INPUT] = {NODE + 2}  # shared its keys, then gone
    workflow = SecAggWorkflow(SecAggSettings(timeout=0.5))
    weights = {NODE + i: _examples(i) for i in range(n)}
    outcome = workflow.secure_round(grid, rnd, weights, 40, lambda nid: f"r{nid - NODE}")

    survivors = [0, 1, 3]
    plain = sum(_examples(i) * _update(i).astype(np.float64) for i in survivors) / sum(_examples(i) for i in survivors)
    assert outcome.update is not None and outcome.refusals == []
    assert np.max(np.abs(outcome.update - plain)) <= outcome.entry["error_bound"]
    assert np.max(np.abs(outcome.update - np.mean([_update(i) for i in range(n)], axis=0))) > 1e-3  # r2 left out
    assert outcome.entry["survivors"] == ["r0", "r1", "r3"] and outcome.entry["dropped"] == ["r2"]
    assert outcome.entry["dropped_at"]["r2"].startswith("masked_input: no reply within")
    assert outcome.entry["total_weight"] == sum(_examples(i) for i in survivors)


def test_a_refusal_during_a_stage_comes_back_as_a_refusal_for_the_strategy_to_record(tmp_path):
    grid = _trained_grid(tmp_path, 2, 1)
    setup = SecAggServer(SecAggConfig(num_clients=2, threshold=2, clip_range=8.0, quant_bits=22, max_weight=100),
                         round_id=1).setup_message()
    secagg.advertise(grid.contexts[NODE].state, NODE, ConfigRecord(setup), {},  # r0 joined a multi-party setup
                     RegionPolicy(delta=1e-5, max_lifetime_epsilon=10.0, max_job_epsilon=10.0),
                     simulation_identity(tmp_path, "r0"), "job")
    workflow = SecAggWorkflow(SecAggSettings(timeout=0.5))
    outcome = workflow.plain_round(grid, 1, NODE, 40, lambda nid: f"r{nid - NODE}")  # "you were alone": refused
    assert outcome.update is None and outcome.entry["aborted"]
    assert [(e.region, e.refused) for e in outcome.refusals] == [("r0", True)]
    assert outcome.refusals[0].text.startswith("allow-plain-rounds:")


def test_push_and_pull_stops_at_its_deadline_and_exchange_names_every_missing_node(tmp_path):
    grid = _trained_grid(tmp_path, 3, 1)
    grid.silent[messages.ADVERTISE] = set(grid.contexts)
    started = time.monotonic()
    out = transport.exchange(grid, messages.ADVERTISE, {nid: {messages.RECORD: ConfigRecord({"round_id": 1})}
                                                        for nid in grid.contexts}, "1", 0.3, str)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert out.ok == {} and set(out.errors) == set(grid.contexts)
    assert all(reason == "no reply within secagg-timeout = 0.3s" for reason in out.errors.values())
    assert grid.pulls > 3  # polled fast, not once every 3 s


def test_the_stage_records_round_trip_through_the_shared_wire():
    keys = {5: {"c_pk": b"c" * 32, "s_pk": b"s" * 32}, (1 << 64) - 1: {"c_pk": b"C" * 32, "s_pk": b"S" * 32}}
    adverts = {5: {"seed_commitment": b"m" * 32, "region": "r0", "signature": b"g" * 64},
               (1 << 64) - 1: {"seed_commitment": b"M" * 32, "region": "r1", "signature": b"G" * 64}}
    entries = messages.read_keys_request(ConfigRecord(messages.keys_request(2, keys, adverts)))
    assert messages.public_keys_of(entries) == keys
    assert {nid: (ad.region, ad.seed_commitment, ad.signature) for nid, ad in entries.items()} == {
        nid: (a["region"], a["seed_commitment"], a["signature"]) for nid, a in adverts.items()}
    assert messages.read_routed_request(ConfigRecord(messages.routed_request(2, {7: b"x", 9: b"y"}))) == {7: b"x", 9: b"y"}
    request = ConfigRecord(messages.unmask_request(2, [3, 1], [2], {3: b"a" * 64, 1: b"b" * 64}))
    assert messages.read_unmask_request(request) == ([3, 1], [2])
    assert messages.read_view_signatures(request) == {1: b"b" * 64, 3: b"a" * 64}
    assert messages.read_consistency_request(ConfigRecord(messages.consistency_request(2, [3, 1]))) == [1, 3]
    assert messages.read_view_record(ConfigRecord(messages.view_record(b"v" * 64))) == b"v" * 64
    answer = {"seed_shares": {3: b"a"}, "key_shares": {2: b"b"}}
    assert messages.unmask_reply(ConfigRecord(messages.unmask_record(answer))) == answer
    assert messages.shares_reply(ConfigRecord(messages.shares_record({4: b"z"}))) == {4: b"z"}
    with pytest.raises(SecAggProtocolError, match="unexpected key"):
        messages.unmask_reply({"both/3": b""})
    with pytest.raises(SecAggProtocolError, match="does not match"):
        messages.read_keys_request({"ids": (5).to_bytes(8, "big"), "c_pks": b"c" * 31, "s_pks": b"s" * 32,
                                    "regions": ["r0"]})
    assert [messages.action(t) for t in messages.STAGES] == [
        "secagg_advertise", "secagg_share_keys", "secagg_masked_input", "secagg_consistency", "secagg_unmask",
        "secagg_reveal"]


@pytest.mark.parametrize("bits", [SECAGG_QUANT_BITS[0] - 1, SECAGG_QUANT_BITS[1] + 1, 48])
def test_one_range_of_quant_bits_for_the_run_config_the_workflow_and_the_region(bits):
    low, high = SECAGG_QUANT_BITS
    line = f"secagg-quant-bits = {bits}: expected an integer in [{low}, {high}]"
    with pytest.raises(ConfigError) as run_config:
        resolve_config({"secagg-quant-bits": bits})
    assert str(run_config.value) == line and "\n" not in line
    with pytest.raises(ConfigError, match=line.replace("[", r"\[").replace("]", r"\]")):
        SecAggWorkflow(SecAggSettings(quant_bits=bits))
    # A coordinator may propose what the protocol library can encode (up to 48 bits) but the run config
    # forbids: the region refuses it, whatever run config it was handed.
    if bits <= 48:
        setup = SecAggServer(SecAggConfig(num_clients=3, threshold=2, quant_bits=bits, max_weight=100)).setup_message()
        with pytest.raises(SecAggProtocolError, match="secagg-quant-bits"):
            secagg.check_setup(setup, {})
    assert FedprivConfig.from_run_config(resolve_config({"secagg-quant-bits": high})[0]).secagg.quant_bits == high
