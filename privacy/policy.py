"""A region's own privacy policy: the rules a region enforces whatever the coordinator asks.

The coordinator chooses the run config, the model and every protocol message; the
threat model treats it as honest-but-curious at best. So every privacy-critical
choice -- δ, the caps on ε, whether DP and secure aggregation are required, the
Shamir threshold floor, which non-DP values may leave -- is the *region's*,
read from a TOML file the region owns:

* in a deployment, the file named by the SuperNode's node config ``policy-path``
  (``fedpriv supernode --policy FILE``); no file → the region refuses to train;
* in a simulation (the operator owns every region), the file named by the run
  config's ``sim-region-policy`` (``""`` = the built-in ``simulations/region-policy.toml``),
  whose optional ``[regions.<name>]`` tables give single regions other values.
  A deployed region ignores every ``sim-*`` key.

Format (``examples/region-policy.toml`` is a documented example)::

    [policy]
    delta = 1e-5                      # the region's δ: ε is always computed at it; a run asking more is refused
    max-lifetime-epsilon = 10.0       # REQUIRED: cap on ε over every release in the region's ledger
    max-job-epsilon = 8.0             # cap on one job's ε (default: max-lifetime-epsilon)
    require-dp = true
    require-secure-aggregation = true
    min-secagg-threshold = 0.5        # t must be MORE than this fraction of a secret's share holders (>= 0.5)
    min-secagg-peers = 1              # authenticated other regions (roster) in any sum that can be unmasked
    allow-plain-rounds = false        # hand the update over in the clear when the coordinator says "alone"
    allow-deterministic-noise = false # the testing key insecure-deterministic-noise: no DP guarantee
    release-train-metrics = false     # train loss / accuracy / peak memory (not private)
    release-lifetime-epsilon = false  # ε over the whole ledger (reveals other jobs)
    release-local-evaluation = false  # loss / accuracy on the local test split (not private)
    max-bundle-age-days = 30.0        # refuse an app bundle signed longer ago than this (a replayed old bundle)
    accountant = "pld"                # the accountant every cap and ceiling is checked with (never the run's)
    max-weight-magnitude = 100.0      # refuse incoming weights above it; training stays within it
    privacy-unit = "author"           # whom ε protects: all posts of one author ("author") or one post ("post")
    max-posts-per-author = 1          # author unit: posts of one author that train in a round (fresh OS-entropy pick)
    unnamed-authors = "refuse"        # data without an author column: refuse, or "own-author" (each post its own)

This module only reads files and compares numbers: no torch, so the light
secure-aggregation handlers can use it.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from fedpriv.core.errors import ConfigError, FedprivError
from fedpriv.privacy.accountant import ACCOUNTANTS  # numpy only, no torch

BUILTIN_SIMULATION_POLICY = Path(__file__).resolve().parents[1] / "simulations" / "region-policy.toml"
"""The policy every simulated region gets when ``sim-region-policy = ""``."""

DEFAULT_MAX_WEIGHT_MAGNITUDE = 100.0
"""``max-weight-magnitude``: 12x all-MiniLM's largest weight (7.91), far below what could overflow float32 in
a forward pass of fedpriv's models (client/incoming.py)."""

POLICY_PATH_KEY = "policy-path"
"""Node-config key naming the region's policy file (an absolute path, set by ``fedpriv supernode --policy``)."""


@dataclass(frozen=True)
class RegionPolicy:
    """What one region allows. Field names are the TOML keys with ``-`` → ``_``."""

    delta: float
    max_lifetime_epsilon: float
    max_job_epsilon: float  # one job's ceiling; the lifetime cap binds as well
    require_dp: bool = True
    require_secure_aggregation: bool = True
    min_secagg_threshold: float = 0.5
    min_secagg_peers: int = 1  # authenticated, distinct other regions in any sum the coordinator can unmask
    allow_plain_rounds: bool = False
    allow_deterministic_noise: bool = False
    release_train_metrics: bool = False
    release_lifetime_epsilon: bool = False
    release_local_evaluation: bool = False
    max_bundle_age_days: float = 30.0  # a signed app bundle older than this is refused (fedpriv.deploy.trusted_exec)
    accountant: str = "pld"  # checks every cap/ceiling and the ε the region records and replies (never the run config's)
    max_weight_magnitude: float = DEFAULT_MAX_WEIGHT_MAGNITUDE  # on every incoming weight, after the cast
    privacy_unit: str = "author"  # whom ε protects: every post of one author ("author") or one post ("post")
    max_posts_per_author: int = 1  # author unit: at most this many posts of one author train in a round
    unnamed_authors: str = "refuse"  # data with no author column: refuse it, or take each post as its own author
    source: str = ""  # where it came from, for messages and the report

    def secagg_threshold_floor(self, share_holders: int) -> int:
        """Least Shamir threshold this region accepts for a secret shared among ``share_holders``.

        Strictly more than ``min-secagg-threshold`` × holders, and never half or fewer: two
        disjoint groups of ``t`` holders would otherwise exist, and a coordinator telling one
        "v survived" and the other "v dropped" would rebuild both of v's secrets.
        """
        return max(2, math.floor(self.min_secagg_threshold * share_holders) + 1)


_BOOLS = ("require-dp", "require-secure-aggregation", "allow-plain-rounds", "allow-deterministic-noise",
          "release-train-metrics", "release-lifetime-epsilon", "release-local-evaluation")
_NUMBERS = ("delta", "max-lifetime-epsilon", "max-job-epsilon", "min-secagg-threshold", "max-bundle-age-days",
            "max-weight-magnitude")
PRIVACY_UNITS = ("author", "post")
UNNAMED_AUTHORS = ("refuse", "own-author")
_STRINGS = {"accountant": ACCOUNTANTS, "privacy-unit": PRIVACY_UNITS, "unnamed-authors": UNNAMED_AUTHORS}
_KEYS = _BOOLS + _NUMBERS + ("min-secagg-peers", "max-posts-per-author") + tuple(_STRINGS)


def policy_from_mapping(table: Mapping[str, Any], source: str, default_accountant: str = "pld",
                        default_unit: str = "author") -> RegionPolicy:
    """Validate one ``[policy]`` table; every problem is one line naming the key and what is expected.

    ``accountant`` defaults to ``pld`` (dp_accounting's PLD, pessimistic: a near-tight upper bound); a simulation
    passes the run's accountant as the default (its operator owns every simulated region)."""
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(f"region policy {source}: unknown key {unknown[0]!r}: expected one of {', '.join(_KEYS)}")
    for key in _BOOLS:
        if key in table and not isinstance(table[key], bool):
            raise ConfigError(f"region policy {source}: {key} = {table[key]!r}: expected true or false")
    for key, allowed in _STRINGS.items():
        if key in table and table[key] not in allowed:
            raise ConfigError(f"region policy {source}: {key} = {table[key]!r}: expected one of {', '.join(allowed)}")
    values: dict[str, Any] = {}
    for key in _NUMBERS:
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"region policy {source}: {key} = {value!r}: expected a finite number")
            values[key] = float(value)
    if "max-lifetime-epsilon" not in values:
        raise ConfigError(f"region policy {source}: max-lifetime-epsilon is missing: expected the region's cap on ε "
                          "over its whole ledger (a number > 0; there is no 'no cap')")
    if "delta" not in values:
        raise ConfigError(f"region policy {source}: delta is missing: expected the region's δ, a probability in "
                          "(0, 1) well below 1/N (e.g. 1e-5)")
    cap = values["max-lifetime-epsilon"]
    job = values.get("max-job-epsilon", cap)
    frac = values.get("min-secagg-threshold", 0.5)
    bound = values.get("max-weight-magnitude", DEFAULT_MAX_WEIGHT_MAGNITUDE)
    checks = [
        (0.0 < values["delta"] < 1.0, "delta", values["delta"], "a probability in (0, 1), e.g. 1e-5"),
        (cap > 0, "max-lifetime-epsilon", cap, "a privacy budget ε > 0"),
        (job > 0, "max-job-epsilon", job, "a ceiling on one job's ε > 0 (the lifetime cap binds as well)"),
        (0.5 <= frac < 1.0, "min-secagg-threshold", frac,
         "a fraction in [0.5, 1): the threshold must exceed this share of a secret's holders (0.5 = a strict majority)"),
        (values.get("max-bundle-age-days", 30.0) > 0, "max-bundle-age-days", values.get("max-bundle-age-days"),
         "a number of days > 0: how long a signed app bundle stays acceptable"),
        (bound > 0, "max-weight-magnitude", bound, f"a bound > 0 on incoming weights (default {DEFAULT_MAX_WEIGHT_MAGNITUDE:g})"),
    ]
    peers = table.get("min-secagg-peers", 1)
    checks.append((type(peers) is int and peers >= 1, "min-secagg-peers", peers,
                   "a whole number >= 1 of authenticated other regions in any sum the coordinator can unmask"))
    per_author = table.get("max-posts-per-author", 1)
    checks.append((type(per_author) is int and per_author == 1, "max-posts-per-author", per_author,
                   "1: one post of each author per round (the author then gets the post-level ε exactly); larger "
                   "bounds need the mixture-of-Gaussians accountant throughout the ledger, which this fedpriv "
                   "does not have yet"))
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"region policy {source}: {key} = {value!r}: expected {expected}")
    return RegionPolicy(
        delta=values["delta"], max_lifetime_epsilon=cap, max_job_epsilon=job, min_secagg_threshold=frac,
        min_secagg_peers=peers, max_bundle_age_days=values.get("max-bundle-age-days", 30.0),
        max_weight_magnitude=bound, **{key.replace("-", "_"): bool(table[key]) for key in _BOOLS if key in table},
        accountant=str(table.get("accountant", default_accountant)), max_posts_per_author=per_author,
        privacy_unit=str(table.get("privacy-unit", default_unit)), unnamed_authors=str(table.get("unnamed-authors", "refuse")),
        source=source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"region policy {path}: no such file: expected a TOML file with a [policy] table") from None
    except IsADirectoryError:
        raise ConfigError(f"region policy {path}: is a directory: expected a TOML file with a [policy] table") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"region policy {path}: not valid TOML ({exc})") from None


def load_policy(path: str | Path) -> RegionPolicy:
    """A region's own policy file (deployment): one ``[policy]`` table and nothing else."""
    path = Path(path)
    data = _read_toml(path)
    extra = sorted(set(data) - {"policy"})
    if extra:
        raise ConfigError(f"region policy {path}: unexpected table {extra[0]!r}: expected only [policy] "
                          "(per-region tables belong to a simulation's sim-region-policy file)")
    if not isinstance(data.get("policy"), dict):
        raise ConfigError(f"region policy {path}: no [policy] table: expected [policy] with at least delta and "
                          "max-lifetime-epsilon")
    return policy_from_mapping(data["policy"], str(path))


def load_simulation_policy(path: str | Path, region: str, default_accountant: str = "pld",
                           default_unit: str = "author") -> RegionPolicy:
    """A simulated region's policy: ``[policy]``, overridden by ``[regions.<region>]`` if present."""
    path = Path(path) if str(path) else BUILTIN_SIMULATION_POLICY
    data = _read_toml(path)
    extra = sorted(set(data) - {"policy", "regions"})
    if extra or not isinstance(data.get("policy"), dict):
        raise ConfigError(f"simulation region policy {path}: expected a [policy] table and optional "
                          f"[regions.<name>] tables{f', not {extra[0]!r}' if extra else ''}")
    regions = data.get("regions", {})
    if not isinstance(regions, dict) or not all(isinstance(v, dict) for v in regions.values()):
        raise ConfigError(f"simulation region policy {path}: regions: expected [regions.<name>] tables")
    return policy_from_mapping({**data["policy"], **regions.get(region, {})}, f"{path} [{region}]", default_accountant,
                               default_unit)


def check_simulation_policy_regions(path: str | Path, regions: tuple[str, ...] | list[str]) -> None:
    """Every ``[regions.<name>]`` table of a simulation policy file names one of the run's regions.

    A misspelt table (``[regions.us-easst]``) would otherwise be ignored and its region run under the
    file's default ``[policy]``: one line naming it instead.
    """
    path = Path(path) if str(path) else BUILTIN_SIMULATION_POLICY
    tables = _read_toml(path).get("regions", {})
    unknown = sorted(set(tables) - set(regions)) if isinstance(tables, dict) else []
    if unknown:
        raise ConfigError(f"simulation region policy {path}: table [regions.{unknown[0]}] names no region of this run: "
                          f"expected one of {', '.join(regions)} (check its spelling, or regions = ...)")


def node_region(node_config: Mapping[str, Any], cfg: Any) -> tuple[str, int]:
    """Which region a process serves (name, index in the run's regions), from its node config.

    A deployment names the region (``region``); a simulation numbers its nodes (``partition-id``).
    """
    if "region" in node_config:
        name = str(node_config["region"])
        if name not in cfg.regions:
            raise ConfigError(f"region {name!r} is not in the run's regions {', '.join(cfg.regions)}")
        return name, cfg.regions.index(name)
    pid = int(node_config.get("partition-id", -1))
    if not 0 <= pid < len(cfg.regions):
        raise ConfigError(f"partition-id {pid} has no region: the run names {len(cfg.regions)} regions "
                          f"({', '.join(cfg.regions)}); start as many simulated nodes")
    return cfg.regions[pid], pid


def region_policy(node_config: Mapping[str, Any], cfg: Any) -> RegionPolicy:
    """The policy of the region a process serves (see :func:`policy_for_node`)."""
    name, _ = node_region(node_config, cfg)
    return policy_for_node(node_config, name, cfg.sim_region_policy, cfg.sim_max_epsilon, cfg.accountant,
                           cfg.privacy_unit)


def policy_for_node(node_config: Mapping[str, Any], region: str, sim_region_policy: str,
                    sim_max_epsilon: float = 0.0, sim_accountant: str = "pld", sim_unit: str = "author") -> RegionPolicy:
    """The policy of the region this process serves.

    Deployment (the node config names a ``region``): only the node config's ``policy-path``
    counts; without one the region has no policy and refuses (:class:`ConfigError`).
    Simulation: the run's ``sim-region-policy`` (and, for older configs, ``sim-max-epsilon``
    > 0 as the lifetime cap); a simulation policy without ``accountant`` / ``privacy-unit`` takes the run's
    (``sim_accountant``, ``sim_unit``): the operator owns every simulated region.
    """
    if "region" in node_config:
        path = str(node_config.get(POLICY_PATH_KEY, "") or "")
        if not path:
            raise PolicyRefusal("policy-path", f"region {region} has no privacy policy: expected node config {POLICY_PATH_KEY!r} "
                              "naming the region's policy file (fedpriv supernode --policy FILE)")
        return load_policy(path)
    policy = load_simulation_policy(sim_region_policy, region, sim_accountant, sim_unit)
    if sim_max_epsilon > 0:
        policy = replace(policy, max_lifetime_epsilon=sim_max_epsilon,
                         max_job_epsilon=min(policy.max_job_epsilon, sim_max_epsilon))
    return policy


class PolicyRefusal(FedprivError):
    """The coordinator asked for something the region's policy forbids; ``rule`` names the policy key."""

    def __init__(self, rule: str, text: str):
        super().__init__(f"{rule}: {text}")
        self.rule = rule


def deterministic_noise_requested(cfg: Any) -> bool:
    """Whether the run asks for the testing key ``insecure-deterministic-noise`` (typed field once it exists)."""
    return bool(getattr(cfg, "insecure_deterministic_noise", False)
                or getattr(cfg, "extra", {}).get("insecure-deterministic-noise", False))


def check_train_request(policy: RegionPolicy, cfg: Any, secure_round: bool) -> None:
    """Refuse, before anything is trained or recorded, a train request the policy forbids.

    ``cfg`` is the coordinator's run config (a :class:`fedpriv.core.config.FedprivConfig`);
    ``secure_round`` whether the train message itself announced a secure-aggregation round.
    The ε-based rules (job ceiling at the planned σ, lifetime cap) need the region's data
    and ledger and are checked by :class:`fedpriv.client.region.RegionRuntime`.
    """
    if deterministic_noise_requested(cfg) and not policy.allow_deterministic_noise:
        raise PolicyRefusal("allow-deterministic-noise", "the run asks for insecure-deterministic-noise (DP noise a "
                            "config can reproduce gives no privacy); this region's policy does not allow it")
    if policy.require_dp and not cfg.dp:
        raise PolicyRefusal("require-dp", "the run asks for dp = false; this region releases only DP-SGD updates")
    if cfg.privacy_unit != policy.privacy_unit:
        raise PolicyRefusal("privacy-unit", f"the run asks for privacy-unit = {cfg.privacy_unit!r}; this region's "
                            f"policy protects one {policy.privacy_unit} (the coordinator cannot change the unit)")
    if cfg.delta > policy.delta:
        raise PolicyRefusal("delta", f"the run asks for δ = {cfg.delta:g}, above the region's δ = {policy.delta:g}")
    if policy.require_secure_aggregation and not (cfg.secure_aggregation and secure_round):
        raise PolicyRefusal("require-secure-aggregation", "the train request is not a secure-aggregation round; this "
                            "region's update leaves it only masked")
    if cfg.dp and cfg.noise_multiplier == 0 and cfg.target_epsilon > policy.max_job_epsilon:
        raise PolicyRefusal("max-job-epsilon", f"the run's target-epsilon = {cfg.target_epsilon:g} is above the "
                            f"region's ceiling on one job's ε = {policy.max_job_epsilon:g}")


def check_secagg_peers(policy: RegionPolicy, peers: int, where: str) -> None:
    """Refuse, before anything masked leaves, a round whose sum would hold fewer authenticated other regions."""
    if peers < policy.min_secagg_peers:
        raise PolicyRefusal("min-secagg-peers", f"{where} {peers} authenticated other region(s); this region needs "
                            f"at least {policy.min_secagg_peers} in any sum the coordinator can unmask")


def check_secagg_threshold(policy: RegionPolicy, threshold: int, share_holders: int) -> None:
    """Refuse a secure-aggregation setup whose Shamir threshold is below the region's floor."""
    floor = policy.secagg_threshold_floor(share_holders)
    if threshold < floor:
        raise PolicyRefusal("min-secagg-threshold", f"threshold t = {threshold} for {share_holders} share holders; "
                            f"this region needs t >= {floor} (more than {policy.min_secagg_threshold:g} of the "
                            "holders, so no two disjoint groups of t holders exist)")
