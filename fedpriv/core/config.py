"""The run configuration: one typed, validated view of ``[tool.flwr.app.config]``.

Flower hands every ServerApp and ClientApp the run config as a flat dict of
kebab-case keys (defaults from ``pyproject.toml``, overridden by ``--run-config``).
:class:`FedprivConfig` turns that dict into typed fields once, and validates it,
so that the CLI can reject a bad value *before* a run is submitted and the apps
can trust what they read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedpriv.core.errors import ConfigError

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app directory (holds ``pyproject.toml``); ``flwr run`` submits it."""

TRAINABLE_CHOICES = ("head", "top-1", "top-2", "top-3", "all")
ACCOUNTANTS = ("rdp", "prv", "pld")  # = fedpriv.privacy.accountant.ACCOUNTANTS (tested); kept here so the CLI stays light
GRAD_SAMPLE_MODES = ("bk", "ghost", "hooks")  # book-keeping (client/book_keeping.py); Opacus: ghost clipping, hooks
LOCAL_OPTIMIZERS = ("sgd", "adam", "adamw")  # the region's optimizer; Opacus makes any of them DP
LOCAL_OPTIMIZER_STATES = ("reset", "keep")  # a fresh local optimizer every round, or its state kept (client/optimizer_state.py)
MIXED_PRECISIONS = ("off", "bf16")  # autocast of the local forward pass (task/device.py)
MODELS = ("minilm", "tiny")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")  # strategies/server_optimizer.py
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A job id: no '/' (a region's ledger keys a release as ``<job-id>/<attempt>`` and splits on the first '/')."""
MAX_SERVER_ROUNDS = 10_000
"""The most rounds a run may ask for: every round is a DP release of every region and a row of the privacy
report (rewritten after each round), and ε grows with each; 10 000 rounds is far beyond any useful DP
fine-tuning (the presets use 2-150), so a larger value is a typo (``1000000`` for ``100``), not a plan."""
SECAGG_QUANT_BITS = (4, 32)
"""The one range of ``secagg-quant-bits``: the run config, the coordinator's workflow and the region's check
of the coordinator's setup all use it (the protocol library itself encodes up to 48 bits)."""


@dataclass(frozen=True)
class SecAggSettings:
    """The run's secure-aggregation settings, validated once (:func:`check_secagg`) when built.

    ``threshold`` 0 = a majority of each secret's share holders; ``neighbours`` 0 = the complete
    graph (SecAgg), ``k`` = SecAgg+; ``clip_range`` bounds a scaled update's coordinates;
    ``quant_bits`` in :data:`SECAGG_QUANT_BITS`; ``timeout`` is each stage's wait in seconds.
    """

    threshold: int = 0
    neighbours: int = 0
    clip_range: float = 8.0
    quant_bits: int = 22
    timeout: float = 300.0

    def __post_init__(self) -> None:
        check_secagg(self.threshold, self.neighbours, self.clip_range, self.quant_bits, self.timeout)


def check_secagg(threshold: int, neighbours: int, clip_range: float, quant_bits: int, timeout: float = 1.0,
                 num_regions: int | None = None) -> None:
    """The one validation of the secagg keys; a :class:`ConfigError` line names the bad value."""
    top = f"an integer in [2, {num_regions}]" if num_regions is not None else "an integer >= 2"
    _check(threshold == 0 or (threshold >= 2 and (num_regions is None or threshold <= num_regions)),
           "secagg-threshold", threshold, f"0 (majority) or {top}")
    _check(neighbours >= 0, "secagg-neighbours", neighbours, "0 (complete graph) or a neighbour count >= 1")
    if neighbours:  # caught here, before submission, not when the ServerApp starts
        _check(threshold <= neighbours + 1, "secagg-threshold", threshold,
               f"an integer <= {neighbours + 1} (with secagg-neighbours = {neighbours} a secret has that many shares)")
    _check(isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range > 0,
           "secagg-clip-range", clip_range, "a coordinate bound > 0")
    low, high = SECAGG_QUANT_BITS
    _check(isinstance(quant_bits, (int, float)) and float(quant_bits).is_integer() and low <= quant_bits <= high,
           "secagg-quant-bits", quant_bits, f"an integer in [{low}, {high}]")
    _check(timeout > 0, "secagg-timeout", timeout, "seconds > 0")


def default_data_dir() -> Path:
    """Where ``fedpriv prepare-data`` writes the corpus unless told otherwise."""
    env = os.environ.get("FEDPRIV_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedpriv" / "data"


def load_app_defaults(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """Read the defaults from the app's ``pyproject.toml``."""
    with (app_dir / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: str | list[str] | None) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` (TOML values) the way ``flwr run --run-config`` does."""
    if not text:
        return {}
    from flwr.common.config import parse_config_args  # imported here: flwr takes seconds to import

    items = [text] if isinstance(text, str) else list(text)
    try:
        return dict(parse_config_args(items))
    except Exception as exc:  # flwr raises ValueError/TOMLDecodeError variants
        raise ConfigError(
            f"cannot parse run config {' '.join(items)!r}: expected 'key=value key2=value2' "
            f"with TOML values ({exc})"
        ) from None


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply overrides, refusing keys the app does not declare (typos must not pass silently)."""
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}: expected one of the keys in "
            f"[tool.flwr.app.config] (e.g. {', '.join(sorted(base)[:6])}, ...)"
        )
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(base[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(base[key]):
            raise ConfigError(
                f"config key {key!r} = {value!r}: expected a {type(base[key]).__name__} "
                f"like the default {base[key]!r}"
            )
        merged[key] = value
    return merged


@dataclass(frozen=True)
class FedprivConfig:
    """Typed run configuration. Field names are the config keys with ``-`` → ``_``."""

    regions: tuple[str, ...]
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_regions: int
    round_timeout: float
    seed: int
    data_dir: Path
    neutral_band: float
    dirichlet_alpha: float
    domain_skew: float
    local_test_fraction: float
    server_test_fraction: float
    max_examples_per_region: int
    max_server_examples: int
    split_unit: str
    privacy_unit: str
    max_length: int
    model: str
    trainable: str
    pooling: str
    lora_rank: int
    local_epochs: float
    local_steps: int
    batch_size: int
    physical_batch_size: int
    learning_rate: float
    local_optimizer: str
    local_optimizer_state: str
    momentum: float
    weight_decay: float
    mixed_precision: str
    max_grad_norm: float
    target_epsilon: float
    noise_multiplier: float
    delta: float
    accountant: str
    grad_sample_mode: str
    dp: bool
    insecure_deterministic_noise: bool
    num_threads: int
    secure_aggregation: bool
    secagg_threshold: int
    secagg_neighbours: int
    secagg_clip_range: float
    secagg_quant_bits: int
    secagg_timeout: float
    server_optimizer: str
    server_learning_rate: float
    server_momentum: float
    server_beta2: float
    server_tau: float
    sim_max_epsilon: float
    sim_ledger_dir: str
    sim_gpus_per_region: float
    sim_region_policy: str
    keep_checkpoints: int
    run_dir: Path
    job_id: str
    resume_from: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedprivConfig":
        """Build and validate from Flower's flat kebab-case run config."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            attr = key.replace("-", "_")
            (values if attr in names else extra)[attr if attr in names else key] = value
        missing = sorted(names - set(values))
        if missing:
            raise ConfigError(f"run config lacks key {missing[0].replace('_', '-')!r}")
        values["regions"] = _parse_regions(str(values["regions"]))
        values["data_dir"] = Path(values["data_dir"]).expanduser() if values["data_dir"] else default_data_dir()
        values["run_dir"] = Path(values["run_dir"]).expanduser() if values["run_dir"] else Path("runs") / "latest"
        config = cls(**values, extra=extra)
        config.validate()
        return config

    @property
    def num_regions(self) -> int:
        return len(self.regions)

    @property
    def secagg(self) -> SecAggSettings:
        """The ``secagg-*`` keys as one settings object (validated with the rest of the config)."""
        return SecAggSettings(int(self.secagg_threshold), int(self.secagg_neighbours), float(self.secagg_clip_range),
                              int(self.secagg_quant_bits), float(self.secagg_timeout))

    def validate(self) -> None:
        """Reject values that would make a run meaningless or unsafe, with one-line reasons."""
        for f in dataclasses.fields(self):  # TOML allows inf and nan: no float key means anything with them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name.replace('_', '-')} = {value!r}: expected a finite number")
        _check(1 <= self.num_server_rounds <= MAX_SERVER_ROUNDS, "num-server-rounds", self.num_server_rounds,
               f"an integer >= 1 and at most {MAX_SERVER_ROUNDS} (each round is a DP release of every region)")
        _check(0.0 < self.fraction_train <= 1.0, "fraction-train", self.fraction_train, "a number in (0, 1]")
        _check(
            1 <= self.min_train_regions <= self.num_regions,
            "min-train-regions",
            self.min_train_regions,
            f"an integer in [1, {self.num_regions}] (the number of regions)",
        )
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "seconds > 0")
        _check(self.neutral_band >= 0, "neutral-band", self.neutral_band, "a rating margin >= 0")
        _check(self.dirichlet_alpha > 0, "dirichlet-alpha", self.dirichlet_alpha, "a number > 0")
        _check(0.0 <= self.domain_skew <= 1.0, "domain-skew", self.domain_skew, "a number in [0, 1]")
        _check(0.0 < self.local_test_fraction < 0.5, "local-test-fraction", self.local_test_fraction, "a number in (0, 0.5)")
        _check(0.0 < self.server_test_fraction < 0.5, "server-test-fraction", self.server_test_fraction, "a number in (0, 0.5)")
        _check(self.max_examples_per_region >= 0, "max-examples-per-region", self.max_examples_per_region, "0 (all) or a positive count")
        _check(self.privacy_unit in ("author", "post"), "privacy-unit", self.privacy_unit,
               "'author' (ε protects all posts of one person) or 'post'; each region's policy decides, a mismatch is refused")
        _check(self.split_unit in ("author", "post"), "split-unit", self.split_unit,
               "'author' (every author's posts on one side of every split) or 'post'")
        _check(self.max_server_examples >= 0, "max-server-examples", self.max_server_examples, "0 (all) or a positive count")
        _check(8 <= self.max_length <= 512, "max-length", self.max_length, "a token count in [8, 512]")
        _check(self.model in MODELS, "model", self.model, f"one of {', '.join(MODELS)}")
        _check(self.trainable in TRAINABLE_CHOICES, "trainable", self.trainable, f"one of {', '.join(TRAINABLE_CHOICES)}")
        _check(self.pooling in ("mean", "cls"), "pooling", self.pooling, "'mean' (sentence-transformer style) or 'cls'")
        _check(self.lora_rank >= 0, "lora-rank", self.lora_rank, "0 (no LoRA) or an adapter rank >= 1")
        _check(self.lora_rank == 0 or self.trainable != "head", "lora-rank", self.lora_rank,
               "0 with trainable = 'head' (LoRA adapts encoder layers: use trainable = top-K or all)")
        _check(self.local_epochs > 0, "local-epochs", self.local_epochs, "a number of epochs > 0")
        _check(self.local_steps >= 0, "local-steps", self.local_steps,
               "0 (steps from local-epochs) or a number of DP-SGD steps per round >= 1")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, "an integer >= 1")
        _check(self.physical_batch_size >= 0, "physical-batch-size", self.physical_batch_size,
               "0 (auto: from the device's free memory) or an integer >= 1")
        _check(self.learning_rate > 0, "learning-rate", self.learning_rate, "a number > 0")
        _check(self.local_optimizer in LOCAL_OPTIMIZERS, "local-optimizer", self.local_optimizer,
               f"one of {', '.join(LOCAL_OPTIMIZERS)}")
        _check(self.local_optimizer_state in LOCAL_OPTIMIZER_STATES, "local-optimizer-state", self.local_optimizer_state,
               f"one of {', '.join(LOCAL_OPTIMIZER_STATES)}")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.momentum == 0 or self.local_optimizer == "sgd", "momentum", self.momentum,
               f"0 with local-optimizer = {self.local_optimizer!r} (momentum is SGD's; Adam has its own betas)")
        _check(self.weight_decay >= 0, "weight-decay", self.weight_decay, "a number >= 0")
        _check(self.mixed_precision in MIXED_PRECISIONS, "mixed-precision", self.mixed_precision,
               f"one of {', '.join(MIXED_PRECISIONS)}")
        _check(self.mixed_precision == "off" or not self.dp or self.grad_sample_mode == "bk", "mixed-precision",
               self.mixed_precision, f"'off' with grad-sample-mode = {self.grad_sample_mode!r} (under bf16 its "
               "per-sample arithmetic lets one post move the clipped sum by more than max-grad-norm; "
               "grad-sample-mode = 'bk' keeps that arithmetic fp32)")
        _check(self.max_grad_norm > 0, "max-grad-norm", self.max_grad_norm, "a clipping norm > 0")
        _check(0.0 < self.delta < 1.0, "delta", self.delta, "a probability in (0, 1), typically < 1/num-examples")
        _check(self.noise_multiplier >= 0, "noise-multiplier", self.noise_multiplier, "0 (derive from target-epsilon) or a value > 0")
        if self.dp and self.noise_multiplier == 0:
            _check(self.target_epsilon > 0, "target-epsilon", self.target_epsilon, "a privacy budget epsilon > 0")
        _check(self.accountant in ACCOUNTANTS, "accountant", self.accountant, f"one of {', '.join(ACCOUNTANTS)}")
        _check(self.grad_sample_mode in GRAD_SAMPLE_MODES, "grad-sample-mode", self.grad_sample_mode,
               f"one of {', '.join(GRAD_SAMPLE_MODES)}")
        check_secagg(self.secagg_threshold, self.secagg_neighbours, self.secagg_clip_range, self.secagg_quant_bits,
                     self.secagg_timeout, num_regions=self.num_regions)
        _check(self.server_optimizer in SERVER_OPTIMIZERS, "server-optimizer", self.server_optimizer,
               f"one of {', '.join(SERVER_OPTIMIZERS)}")
        _check(self.server_learning_rate > 0, "server-learning-rate", self.server_learning_rate, "a number > 0")
        _check(0.0 <= self.server_momentum < 1.0, "server-momentum", self.server_momentum, "a number in [0, 1)")
        _check(0.0 <= self.server_beta2 < 1.0, "server-beta2", self.server_beta2, "a number in [0, 1)")
        _check(self.server_tau > 0, "server-tau", self.server_tau, "a number > 0")
        _check(self.sim_gpus_per_region >= 0 and (self.sim_gpus_per_region <= 1 or self.sim_gpus_per_region.is_integer()),
               "sim-gpus-per-region", self.sim_gpus_per_region,
               "0 (auto: share the machine's GPUs evenly), a fraction in (0, 1], or a whole number of GPUs")
        _check(self.sim_max_epsilon >= 0, "sim-max-epsilon", self.sim_max_epsilon,
               "0 (the simulation policy's own cap) or a budget > 0")
        _check(self.num_threads >= 1, "num-threads", self.num_threads, "an integer >= 1")
        _check(self.keep_checkpoints >= 0, "keep-checkpoints", self.keep_checkpoints,
               "0 (keep every round's checkpoint) or the number of newest rounds to keep >= 1")
        _check(self.job_id == "" or JOB_ID.fullmatch(str(self.job_id)) is not None, "job-id", self.job_id,
               "'' (set by the CLI) or 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit "
               "(a region keys its releases as '<job-id>/<attempt>')")


def _parse_regions(text: str) -> tuple[str, ...]:
    regions = tuple(r.strip() for r in text.split(",") if r.strip())
    if not regions:
        raise ConfigError(f"regions = {text!r}: expected a comma-separated list of at least 1 region name")
    if len(set(regions)) != len(regions):
        raise ConfigError(f"regions = {text!r}: region names must be unique")
    for name in regions:
        if not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(f"region name {name!r}: expected letters, digits, '-' or '_'")
    return regions


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def resolve_config(overrides: Mapping[str, Any] | None = None, preset: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], FedprivConfig]:
    """Defaults ← preset ← overrides; returns the flat dict (to submit) and its typed view."""
    flat = merge_config(load_app_defaults(), preset or {})
    flat = merge_config(flat, overrides or {})
    return flat, FedprivConfig.from_run_config(flat)
