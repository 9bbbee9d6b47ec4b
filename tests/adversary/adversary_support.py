"""The curious coordinator's workbench: real regions (ClientApp handlers, RegionRuntime, ledger) on tiny shards.

A test plays the coordinator: it chooses the run config and every message, sends them to
the real ``fedpriv.client.app.app`` of a region whose node config names its own policy file, and
inspects what comes back and what the region recorded. Local training is the real
DP-SGD on the tiny model (64 posts, batch 32: two steps per round), so a test takes seconds.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import fixed_task_identity
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_from_proto, recorddict_to_proto

from fedpriv.core import contract
from fedpriv.privacy.secagg import messages
from fedpriv.core.config import FedprivConfig, resolve_config
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.task.data import Example
from fedpriv.task.partition import PartitionSpec, partition_corpus, write_shards

REGIONS = ("us-east", "eu-west", "ap-south", "sa-east")
DELTA = 1e-5
WORDS = ["good", "bad", "great", "awful", "the", "movie", "food", "day", "really", "was", "it", "service"]
NODE_BASE = (1 << 62) + 101


def build_shards(root: Path) -> Path:
    rng = random.Random(0)
    domains = ["tweets", "amazon", "movies", "nyt"]
    corpus = [Example(id=f"e{i}", text=" ".join(rng.choice(WORDS) for _ in range(6)), label=i % 2,
                      domain=domains[i % 4], rating=(1.5 if i % 2 else -1.5)) for i in range(800)]
    spec = PartitionSpec(regions=REGIONS, seed=0, dirichlet_alpha=100.0, domain_skew=0.0,
                         max_examples_per_region=64, max_server_examples=32)
    return write_shards(partition_corpus(corpus, spec), root)


def run_config(shard_root: Path, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The coordinator's run config: tiny model, σ fixed at 1.0 unless overridden, secure aggregation on."""
    base = {"noise-multiplier": 1.0, "model": "tiny", "trainable": "all", "regions": ",".join(REGIONS),
            "num-server-rounds": 3, "batch-size": 32, "physical-batch-size": 32, "local-epochs": 1.0,
            "target-epsilon": 3.0, "delta": DELTA, "accountant": "rdp", "num-threads": 1,
            "data-dir": str(shard_root), "run-dir": str(run_dir), "job-id": "job-1"}
    flat, _ = resolve_config({**base, **overrides})
    return flat


def toml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def write_policy(path: Path, **rules: Any) -> Path:
    """A region's policy file: the deployment defaults (examples/region-policy.toml) unless ``rules`` say otherwise."""
    keys = {"delta": DELTA, "max-lifetime-epsilon": 50.0, "max-job-epsilon": 20.0, **rules}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[policy]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()))
    return path


def region_keys(home: Path, name: str) -> dict[str, str]:
    """Node config naming the region's identity key and its roster of every region in REGIONS (made once per home)."""
    from fedpriv.privacy.secagg.identity import ROSTER_FILE, identity_paths, write_simulation_identities

    keys = home / "identities"
    if not (keys / ROSTER_FILE).exists():
        write_simulation_identities(home, REGIONS)
        (home / "secagg-identities").rename(keys)
    return {"identity-key-path": str(identity_paths(keys, name)[0]), "roster-path": str(keys / ROSTER_FILE)}


class Region:
    """One deployed region: its node config (region, data, ledger, policy) and its ClientApp context."""

    def __init__(self, name: str, shard_root: Path, home: Path, flat: dict[str, Any], **policy: Any):
        from fedpriv.client.app import app

        self.app = app
        self.name = name
        self.node_id = NODE_BASE + 977 * REGIONS.index(name)
        self.ledger_path = home / f"{name}.sqlite"
        self.policy_path = write_policy(home / f"{name}-policy.toml", **policy)
        node_config = {"region": name, "data-path": str(shard_root), "ledger-path": str(self.ledger_path),
                       "policy-path": str(self.policy_path), **region_keys(home, name)}
        self.context = Context(run_id=7, node_id=self.node_id, node_config=node_config, state=RecordDict(),
                               run_config=dict(flat))

    @property
    def cfg(self) -> FedprivConfig:
        return FedprivConfig.from_run_config(self.context.run_config)

    def send(self, message_type: str, content: RecordDict, group_id: str = "") -> Message:
        """Deliver one message as a real transport would (protobuf both ways, state as for a fresh process)."""
        msg = Message(content, self.node_id, message_type, group_id=group_id)
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        msg = message_from_proto(message_to_proto(msg))
        self.context.state = recorddict_from_proto(recorddict_to_proto(self.context.state))
        return message_from_proto(message_to_proto(self.app(msg, self.context)))

    def train(self, arrays, server_round: int = 1, secagg_round: int | None = 1) -> Message:
        config = {"server-round": server_round}
        if secagg_round is not None:
            config[messages.TRAIN_FLAG] = secagg_round
        return self.send("train", RecordDict({contract.ARRAYS: arrays, contract.CONFIG: ConfigRecord(config)}))

    def stage(self, message_type: str, record: ConfigRecord, round_id: int = 1) -> Message:
        return self.send(message_type, RecordDict({messages.RECORD: record}), group_id=str(round_id))

    def releases(self) -> list:
        if not self.ledger_path.exists():
            return []
        with PrivacyLedger(self.ledger_path) as ledger:
            return ledger.releases()


def global_arrays(flat: dict[str, Any]):
    """The coordinator's initial global model (its trainable values), as sent in a train message."""
    from fedpriv.task.model import build_model, get_trainable, to_array_record

    cfg = FedprivConfig.from_run_config(flat)
    return to_array_record(get_trainable(build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank)))


def refusal(reply: Message) -> contract.RegionError:
    """The parsed refusal of an error reply (fails the test if the reply is not a refusal)."""
    assert reply.has_error(), f"expected a refusal, got a reply with {list(reply.content.keys())}"
    err = contract.parse_error(reply.error.reason, "?")
    assert reply.error.code == contract.REFUSED and err.refused, reply.error.reason
    return err


# Fixtures the curious-coordinator test modules import: a ClientApp task identity and one set of tiny shards.


@pytest.fixture(autouse=True)
def task_identity():
    with fixed_task_identity():
        yield


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("shards"))
