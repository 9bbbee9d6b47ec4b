"""Everything one region does in a round, without Flower in the way.

A region is identified by its node config: ``region``, ``data-path`` and
``policy-path`` in a real deployment (``fedpriv supernode`` sets them, with the
region's ledger), or ``partition-id`` in a simulation (mapped to the run's
``regions`` list, data under ``data-dir``, policy from ``sim-region-policy``).
The region only ever reads its own shard.

The region's privacy policy (:mod:`fedpriv.privacy.policy`) is enforced here, *before*
training and before anything is recorded: a refused request leaves the ledger and
the model untouched. ε is always computed at the policy's δ, never the run's.

Privacy bookkeeping lives in the region's durable ledger (``privacy/ledger.py``),
not in Flower's per-run state: the run's history (for composing ε across rounds,
also across a coordinator restart) is the ledger's releases for this job, and the
lifetime cap is checked against the whole ledger -- every run that ever used this
data. A release is recorded *before* the update leaves the region, in the same
write transaction that checks it was not released before.
"""

from __future__ import annotations

import math
import warnings
from logging import ERROR, INFO
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flwr.common.logger import log

from fedpriv.client import optimizer_state, release_store
from fedpriv.client.contribution import bounded_count, bounded_indices
from fedpriv.client.incoming import check_incoming
from fedpriv.task.device import select_device
from fedpriv.client.trainer import LocalTrainer, TrainResult, choose_noise_multiplier, region_schedule
from fedpriv.core.config import FedprivConfig
from fedpriv.core.errors import BudgetExhausted
from fedpriv.privacy.accountant import epsilon_of
from fedpriv.privacy.ledger import (BudgetDecision, LedgerDamaged, PrivacyLedger, Release, default_ledger_path,
                                   epsilon_of_history)
from fedpriv.privacy.policy import PolicyRefusal, RegionPolicy, check_train_request, node_region, region_policy
from fedpriv.task.data import author_key
from fedpriv.task.encoding import encode
from fedpriv.task.features import FeatureDataset, SplitClassifier, cache_key, evaluate_top
from fedpriv.task.model import build_model, load_tokenizer, set_trainable_values
from fedpriv.task.partition import cap_shard, load_region, region_dir, region_test_path, region_train_path
from fedpriv.task.progress import Progress


@dataclass(frozen=True)
class RegionIdentity:
    name: str
    index: int
    data_root: Path
    ledger_path: Path
    policy: RegionPolicy

    @property
    def max_epsilon(self) -> float:
        """The region's lifetime cap (its policy's ``max-lifetime-epsilon``)."""
        return self.policy.max_lifetime_epsilon


def identify_region(node_config: Mapping[str, Any], cfg: FedprivConfig) -> RegionIdentity:
    """Which region this process serves, its policy and its ledger, from the SuperNode's node config.

    In a deployment the policy and the ledger location come *only* from the region's
    node config: the coordinator's run config (every ``sim-*`` key included) cannot
    change a region's rules or budget.
    """
    name, index = node_region(node_config, cfg)
    policy = region_policy(node_config, cfg)
    if "region" in node_config:
        root = Path(str(node_config.get("data-path", cfg.data_dir)))
        ledger = Path(str(node_config["ledger-path"])) if node_config.get("ledger-path") else default_ledger_path(region_dir(root, name))
        return RegionIdentity(name, index, root, ledger, policy)
    ledger_dir = Path(cfg.sim_ledger_dir) if cfg.sim_ledger_dir else Path(cfg.run_dir) / "ledgers"
    return RegionIdentity(name, index, cfg.data_dir, ledger_dir / f"{name}.sqlite", policy)


def clamp_epsilon(epsilon: float) -> float:
    """ε is never negative (an RDP conversion at a huge δ can return one); ∞ stays ∞."""
    return max(0.0, float(epsilon))


@dataclass
class RoundOutcome:
    result: TrainResult
    epsilon: float            # cumulative over this job's rounds
    lifetime_epsilon: float   # over every release in the region's ledger
    history: list[tuple[float, float, int]]
    steps: int
    base: dict[str, np.ndarray] | None = None  # the global values the release was trained from (secure rounds mask
    reused: bool = False                       # values - base); reused: a retry answered with the stored release


class RegionRuntime:
    """Loads the region's shard and the shared model; trains and evaluates the global model."""

    def __init__(self, cfg: FedprivConfig, identity: RegionIdentity):
        self.cfg = cfg
        self.identity = identity
        self.device = select_device(cfg.num_threads)
        self.tokenizer = load_tokenizer()
        # the run's max-examples-per-region, applied by the region to its own shard (simulation shards already are)
        self.shard = cap_shard(load_region(identity.data_root, identity.name), cfg.max_examples_per_region, cfg.seed)
        self.split = SplitClassifier(build_model(cfg.model, cfg.trainable, cfg.seed, cfg.pooling, cfg.lora_rank), cfg.trainable)
        self._feature_sets: dict[str, FeatureDataset] = {}

    def round_seed(self, server_round: int) -> int:
        """Distinct, reproducible randomness per (run seed, region, round)."""
        return int(np.random.SeedSequence([self.cfg.seed, self.identity.index, server_round]).generate_state(1)[0])

    def _features(self, split_name: str) -> FeatureDataset:
        """The frozen prefix's features of the shard's ``split_name`` posts (computed once per runtime)."""
        if split_name not in self._feature_sets:
            self._feature_sets[split_name] = self._load_features(split_name)
        return self._feature_sets[split_name]

    def _load_features(self, split_name: str) -> FeatureDataset:
        examples = self.shard.train if split_name == "train" else self.shard.test
        data = encode(examples, self.tokenizer, self.cfg.max_length)
        shard_path = region_train_path if split_name == "train" else region_test_path
        shard_file = shard_path(self.identity.data_root, self.identity.name)
        capped = f"|{len(examples)}" if self.cfg.max_examples_per_region else ""  # a capped shard's own features
        key = cache_key(self.cfg.model, self.cfg.trainable + capped, self.cfg.pooling, self.cfg.max_length, self.cfg.seed,
                        shard_file)
        cache_dir = shard_file.parent / ".fedpriv-cache"
        progress = Progress(f"{self.identity.name}: feature extraction ({split_name})", len(examples))
        try:
            found = self.split.features(data, self.device, (cache_dir, key), progress=progress)
        except OSError:  # a read-only data dir: compute without caching
            found = self.split.features(data, self.device, progress=progress)
        if progress.done:  # computed now (not read from the cache): the log says it ran and how long it took
            progress.close()
        return found

    def train(self, global_values: dict[str, np.ndarray], server_round: int, job_id: str, attempt_id: str,
              secure_round: bool | None = None) -> RoundOutcome:
        """Enforce the policy, check the budget, train, record the release, and only then hand the update back.

        ``secure_round``: whether the train message announced a secure-aggregation round
        (None: as the run config says). Every refusal happens before training and before
        the ledger is written. A round of ``job_id`` the ledger already holds is answered with
        the stored release (:mod:`fedpriv.client.release_store`): no training, no new ε.
        """
        check_incoming(global_values, self.split.model, self.identity.policy.max_weight_magnitude)  # before anything
        policy = self.identity.policy
        cfg = self.cfg
        check_train_request(policy, cfg, cfg.secure_aggregation if secure_round is None else secure_round)
        self._check_authors()
        delta, accountant = policy.delta, policy.accountant  # ε is the region's: its δ, its accountant
        schedule = region_schedule(self.train_size(), cfg)
        with self._ledger() as ledger:
            reused = self._reuse(ledger, job_id, server_round)
            if reused is not None:
                return reused
            sigma = self._noise_multiplier(ledger, schedule, job_id)
            job_releases = ledger.job_releases(job_id)
        job_history = [r.history_entry for r in job_releases]
        planned = Release(run_id=job_id, round=server_round, steps=schedule.steps_per_round,
                          sample_rate=schedule.sample_rate, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                          delta=delta, accountant=accountant, attempt=attempt_id)
        if cfg.dp:
            self._check_job_ceiling(schedule, sigma, job_history + [planned.history_entry], server_round)
        cap = self.identity.max_epsilon if cfg.dp else math.inf  # a non-DP release (policy allows it) is ∞
        ceiling = policy.max_job_epsilon if cfg.dp else math.inf
        with self._ledger() as ledger:
            if cfg.dp:  # an early answer, before training; reserve() below decides
                self._raise_if_refused(ledger.check_budget(cap, planned, delta, accountant))
            set_trainable_values(self.split.model, global_values)
            trainer = LocalTrainer(self.split, self._round_data(), cfg, self.device, policy.max_weight_magnitude)
            result = trainer.train(job_history, sigma, seed=self.round_seed(server_round), label=self.identity.name,
                                   optimizer_state=self._kept_optimizer_state(job_id, job_releases))
            stored, digest = self._store_release(job_id, server_round, global_values, result)
            release = replace(planned, digest=digest)
            # lifetime cap and job ceiling in the one write transaction that records the release
            decision = ledger.reserve(release, cap, delta, accountant, new_only=True, max_job_epsilon=ceiling)
            if not decision.allowed:  # another process released this round, or spent the budget, meanwhile
                if stored is not None:
                    release_store.discard(stored)
                self._raise_if_refused(decision)
            self._keep_optimizer_state(job_id, server_round, result)  # only now: its steps are accounted
            self._prune_releases(job_id)
            history = job_history + [release.history_entry]
            lifetime = clamp_epsilon(ledger.epsilon(delta, accountant)) if cfg.dp else math.inf
        epsilon = clamp_epsilon(epsilon_of(history, delta, accountant)) if cfg.dp else math.inf
        return RoundOutcome(result, epsilon, lifetime, history, sum(h[2] for h in history), base=global_values)

    def train_size(self) -> int:
        """N of a round: the posts that may train in it -- under the author unit, at most m per author."""
        if self.identity.policy.privacy_unit != "author":
            return len(self.shard.train)
        return bounded_count(self._authors(), self.identity.policy.max_posts_per_author)

    def _authors(self) -> list[str]:
        return [author_key(e) for e in self.shard.train]

    def _round_data(self) -> FeatureDataset:
        """The round's training posts: all of them (post unit), or at most m per author drawn afresh from OS
        entropy (author unit, :mod:`fedpriv.client.contribution`); the count is :meth:`train_size` either way."""
        data = self._features("train")
        if self.identity.policy.privacy_unit != "author":
            return data
        keep = bounded_indices(self._authors(), self.identity.policy.max_posts_per_author)
        return FeatureDataset([data.features[i] for i in keep], [data.labels[i] for i in keep])

    def _check_authors(self) -> None:
        """Author unit: the data must say who wrote what, unless the policy takes each post as its own author."""
        policy = self.identity.policy
        if policy.privacy_unit == "author" and not self.shard.names_authors and policy.unnamed_authors != "own-author":
            raise PolicyRefusal("unnamed-authors", "the region's data has no author column, so its privacy unit "
                                "(the author) cannot be bounded; add the column, or set unnamed-authors = "
                                "\"own-author\" if every post really has a different author")

    def _ledger(self) -> PrivacyLedger:
        """The region's ledger; a damaged one refuses the round (the detail, with its path, stays in the log)."""
        try:
            return PrivacyLedger(self.identity.ledger_path)
        except LedgerDamaged as exc:
            log(ERROR, "%s: %s", self.identity.name, exc)
            raise BudgetExhausted(LEDGER_DAMAGED) from None

    def _raise_if_refused(self, decision: BudgetDecision) -> None:
        """A refusal says the rule; the ledger's ε and size only when the policy releases the lifetime ε."""
        if decision.allowed:
            return
        log(INFO, "%s: %s", self.identity.name, decision.detail or decision.reason)
        text = decision.detail if self.identity.policy.release_lifetime_epsilon and decision.detail else decision.reason
        if decision.rule == "max-job-epsilon":
            raise PolicyRefusal("max-job-epsilon", text.split(": ", 1)[-1])
        raise BudgetExhausted(text)

    def _reuse(self, ledger: PrivacyLedger, job_id: str, server_round: int) -> RoundOutcome | None:
        """A retry of a round the ledger holds: the stored release, with the ε and history of its first reply."""
        row = ledger.release_of(job_id, server_round)
        if row is None:
            return None
        stored = release_store.load_release(self.identity.ledger_path, self.identity.name, job_id, server_round,
                                            row.digest)
        if stored is None:  # not stored (older fedpriv, a failed write, pruned) or altered: never train it again
            raise BudgetExhausted(_already_released(server_round))
        job_rows = ledger.job_releases(job_id)
        history = [r.history_entry for r in job_rows[:job_rows.index(row) + 1]]
        delta, accountant = self.identity.policy.delta, self.identity.policy.accountant
        dp = row.noise_multiplier > 0
        epsilon = clamp_epsilon(epsilon_of(history, delta, accountant)) if dp else math.inf
        lifetime = clamp_epsilon(epsilon_of_history(ledger.history_upto(row), delta, accountant)) if dp else math.inf
        result = TrainResult(values=stored.values, loss=stored.loss, accuracy=stored.accuracy,
                             num_examples=stored.num_examples, steps=row.steps, history=history,
                             noise_multiplier=row.noise_multiplier, sample_rate=row.sample_rate,
                             peak_memory_mb=stored.peak_memory_mb)
        log(INFO, "%s: round %d of job %s is already released: answering with the stored release (no new ε)",
            self.identity.name, server_round, job_id)
        return RoundOutcome(result, epsilon, lifetime, history, sum(h[2] for h in history), base=stored.base,
                            reused=True)

    def _store_release(self, job_id: str, server_round: int, base: dict[str, np.ndarray],
                       result: TrainResult) -> tuple[Path | None, str]:
        """Keep the release for a retry; a failed write only means a retry of this round is refused, not re-paid."""
        try:
            return release_store.save_release(self.identity.ledger_path, self.identity.name, job_id, server_round,
                                              result.values, base, result.num_examples, result.loss, result.accuracy,
                                              result.peak_memory_mb)
        except OSError as exc:
            warnings.warn(f"{self.identity.name}: could not store round {server_round}'s release for a retry ({exc}); "
                          "a retry of it will be refused")
            return None, ""

    def _prune_releases(self, job_id: str) -> None:
        try:
            release_store.prune(self.identity.ledger_path, self.identity.name, job_id)
        except OSError:
            pass

    def _optimizer_state_file(self, job_id: str) -> Path:
        return optimizer_state.state_file(self.identity.ledger_path, self.identity.name, job_id)

    def _kept_optimizer_state(self, job_id: str, job_releases: list[Release]) -> dict[str, np.ndarray] | None:
        """``local-optimizer-state = keep``: the state saved after this job's last recorded release, if any."""
        if self.cfg.local_optimizer_state != "keep" or not job_releases:
            return None
        last = max(r.round for r in job_releases)
        return optimizer_state.load_state(self._optimizer_state_file(job_id), job_id, last)

    def _keep_optimizer_state(self, job_id: str, server_round: int, result: TrainResult) -> None:
        """Save the state after a round whose release the ledger has just recorded; after the job's last round,
        delete it instead; and every round, other jobs' stale states (whatever this job's mode). A failed write
        only costs the next round its moments (it will not find this round's state and starts fresh)."""
        path = self._optimizer_state_file(job_id)
        try:
            optimizer_state.prune_stale_states(path.parent, self.identity.name, keep=path)  # also under reset
            if server_round >= self.cfg.num_server_rounds:  # the job's last round: nothing will load it
                optimizer_state.forget_state(path)
            elif result.optimizer_state:  # not under reset, nor for an optimizer without state (plain SGD)
                optimizer_state.save_state(path, job_id, server_round, result.optimizer_state)
        except OSError as exc:
            warnings.warn(f"{self.identity.name}: could not keep the local optimizer state ({exc}); the next round "
                          "starts with a fresh optimizer")

    def _check_job_ceiling(self, schedule, sigma: float, history_after: list, server_round: int) -> None:
        """``max-job-epsilon``: refuse a σ too low for the planned rounds, and any round beyond the ceiling."""
        policy, cfg = self.identity.policy, self.cfg
        ceiling = policy.max_job_epsilon
        planned = clamp_epsilon(epsilon_of([(sigma, schedule.sample_rate, schedule.total_steps)], policy.delta,
                                           policy.accountant))
        if planned > ceiling:
            raise PolicyRefusal("max-job-epsilon", f"σ = {sigma:.4g} over the planned {cfg.num_server_rounds} "
                                f"round(s) spends ε = {planned:.4g} at δ = {policy.delta:g}, above the region's "
                                f"ceiling on one job's ε = {ceiling:g}")
        after = clamp_epsilon(epsilon_of(history_after, policy.delta, policy.accountant))
        if after > ceiling:
            raise PolicyRefusal("max-job-epsilon", f"round {server_round} would take this job's ε to {after:.4g} at "
                                f"δ = {policy.delta:g}, above the region's ceiling on one job's ε = {ceiling:g}")

    def _noise_multiplier(self, ledger: PrivacyLedger, schedule, job_id: str) -> float:
        """σ is fixed for a job: planned once for the whole schedule, then read back from the ledger."""
        if not self.cfg.dp:
            return 0.0
        for release in ledger.job_releases(job_id):
            if release.sample_rate == schedule.sample_rate \
                    and release.steps == schedule.steps_per_round:
                return release.noise_multiplier
        return choose_noise_multiplier(schedule, self.cfg)

    def evaluate(self, global_values: dict[str, np.ndarray]) -> tuple[float, float, int]:
        """Loss and accuracy on the local test split: not DP, so only when the policy releases them."""
        if not self.identity.policy.release_local_evaluation:
            raise PolicyRefusal("release-local-evaluation", LOCAL_EVALUATION_REFUSED)
        check_incoming(global_values, self.split.model, self.identity.policy.max_weight_magnitude)
        set_trainable_values(self.split.model, global_values)
        data = self._features("test")
        loss, accuracy = evaluate_top(self.split.top, data, self.device)
        return loss, accuracy, len(data)


LOCAL_EVALUATION_REFUSED = ("loss and accuracy on the region's test split are not differentially private (on a model "
                            "the coordinator chose, one loss value can test membership); this region does not "
                            "release them")


LEDGER_DAMAGED = ("the region's privacy ledger failed its checks (missing, empty, damaged or rolled back): the "
                  "region trains nothing until its operator restores it")


def _already_released(server_round: int) -> str:
    return (f"round {server_round} of this job was already released once and that release cannot be sent again; "
            "training it again would be a second, unaccounted release")
