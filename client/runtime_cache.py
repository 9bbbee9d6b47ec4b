"""Keep a region's loaded runtime (tokenizer, shard, model, frozen-prefix features) across rounds.

Flower calls the ClientApp once per message; a simulation actor (or a SuperNode's ClientApp process) lives
for many rounds. Building :class:`fedpriv.client.region.RegionRuntime` afresh every round re-reads the
shard, rebuilds the model and re-tokenises every post before the cached features can be looked up:
~1.5 s per region per round for the default split on 2 CPU cores, more than a head round's DP steps.

What is reused holds nothing a round leaves behind: every round sets the model's trainable values from
the coordinator's message, builds a new optimizer and privacy engine, and reads the region's ledger and
policy anew (``identity`` is refreshed on every call). A round that raises may have left Opacus or
book-keeping hooks on the model, so its runtime is dropped (:func:`drop`). The key includes the whole run
config and the shard files' size and modification time, so another run, config or shard gets its own entry;
at most :data:`MAX_RUNTIMES` stay (one actor may serve several simulated regions).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from fedpriv.client import region as region_module
from fedpriv.client.region import RegionIdentity, RegionRuntime
from fedpriv.core.config import FedprivConfig
from fedpriv.task.partition import region_test_path, region_train_path

MAX_RUNTIMES = 4

_RUNTIMES: "OrderedDict[tuple, RegionRuntime]" = OrderedDict()


def _key(cfg: FedprivConfig, identity: RegionIdentity) -> tuple:
    stamps = []
    for path in (region_train_path(identity.data_root, identity.name), region_test_path(identity.data_root, identity.name)):
        try:
            stat = path.stat()
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((str(path), None, None))
    return repr(cfg), identity.name, str(identity.data_root), tuple(stamps)


def runtime(cfg: FedprivConfig, identity: RegionIdentity) -> RegionRuntime:
    """This process's runtime for ``(cfg, identity)``: reused when the run, the config and the shard are the same."""
    key = _key(cfg, identity)
    found = _RUNTIMES.pop(key, None)
    found = found if found is not None else region_module.RegionRuntime(cfg, identity)  # looked up now: tests swap it
    found.identity = identity  # the node's policy and ledger, read for this call
    _RUNTIMES[key] = found
    while len(_RUNTIMES) > MAX_RUNTIMES:
        _RUNTIMES.popitem(last=False)
    return found


@contextmanager
def kept(cfg: FedprivConfig, identity: RegionIdentity) -> Iterator[RegionRuntime]:
    """:func:`runtime`, dropped again if the work done with it raises."""
    region = runtime(cfg, identity)
    try:
        yield region
    except BaseException:
        drop(region)
        raise


def drop(region: RegionRuntime) -> None:
    """Forget ``region`` (after a round that raised: it may carry a half-finished round's hooks)."""
    for key in [k for k, v in _RUNTIMES.items() if v is region]:
        del _RUNTIMES[key]


def clear() -> None:
    _RUNTIMES.clear()
