"""``fedpriv plan``: choose the noise multiplier for a target ε and show ε round by round.

It plans the schedule a region runs (:mod:`fedpriv.privacy.schedule`: q = 1/ceil(N/B), ceil(E·ceil(N/B)) steps
per round) with the same σ search and accountant, so the table is the ε a run then records, with the
cross-check accountant's ε beside it. ``--compare`` shows σ for the target under every accountant.
"""

from __future__ import annotations

import argparse
import json
import math

from fedpriv.commands.registry import command
from fedpriv.core.config import ACCOUNTANTS
from fedpriv.core.errors import ConfigError

def _app_defaults() -> dict:
    """The plan's defaults are the app's: what `fedpriv simulate` would run with no overrides."""
    from fedpriv.core.config import load_app_defaults

    app = load_app_defaults()
    return {"delta": float(app["delta"]), "rounds": int(app["num-server-rounds"]), "batch_size": int(app["batch-size"]),
            "local_epochs": float(app["local-epochs"]), "local_steps": int(app.get("local-steps", 0)),
            "accountant": str(app["accountant"])}


DEFAULTS = _app_defaults()


@command("plan", "Choose a noise multiplier for a target epsilon and show the epsilon trajectory.")
class PlanCommand:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target-epsilon", type=float, required=True, metavar="E",
                       help="privacy budget ε for the whole run, per region")
        p.add_argument("--delta", type=float, default=DEFAULTS["delta"], metavar="D",
                       help="δ of the (ε, δ) guarantee; keep it well below 1/num-examples (default: %(default)g)")
        p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"], metavar="R",
                       help="federated rounds the region trains in (default: %(default)s)")
        steps = p.add_mutually_exclusive_group()
        steps.add_argument("--local-steps", type=int, metavar="S",
                           help="DP-SGD steps per round, the run config's local-steps (default: %s)"
                                % (DEFAULTS["local_steps"] or "from --local-epochs"))
        steps.add_argument("--local-epochs", type=float, metavar="X",
                           help="local epochs per round; steps = ceil(X · ceil(N / B)) (default: %s)" % DEFAULTS["local_epochs"])
        p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], metavar="B",
                       help="logical batch size; Poisson sample rate = 1 / ceil(N / B), Opacus' rate "
                            "(default: %(default)s)")
        p.add_argument("--num-examples", type=int, required=True, metavar="N",
                       help="training examples in the region")
        p.add_argument("--accountant", choices=ACCOUNTANTS, default=DEFAULTS["accountant"],
                       help="accountant for the noise search and the reported ε (default: %(default)s); "
                            "cross-checked by PLD (rdp, prv) or PRV (pld)")
        p.add_argument("--no-cross-check", action="store_true",
                       help="skip the cross-check accountant (faster)")
        p.add_argument("--compare", action="store_true",
                       help="also show the noise multiplier every accountant needs for the target")
        p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fedpriv.privacy.planner import plan_schedule
        from fedpriv.privacy.schedule import batches_per_epoch, sample_rate_for, steps_per_round

        _check(args.num_examples >= 1, "--num-examples", args.num_examples, "a number of training examples >= 1")
        _check(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1")
        _check(args.batch_size <= args.num_examples, "--batch-size", args.batch_size,
               f"at most --num-examples = {args.num_examples}")
        if args.local_steps is None and args.local_epochs is None and DEFAULTS["local_steps"]:
            args.local_steps = DEFAULTS["local_steps"]
        if args.local_steps is not None:
            _check(args.local_steps >= 1, "--local-steps", args.local_steps, "an integer >= 1")
            steps = args.local_steps
            how = f"{steps} local steps"
        else:
            epochs = DEFAULTS["local_epochs"] if args.local_epochs is None else args.local_epochs
            _check(math.isfinite(epochs) and epochs > 0, "--local-epochs", epochs, "a number of epochs > 0")
            steps = steps_per_round(args.num_examples, args.batch_size, epochs)
            how = (f"{steps} local steps (= ceil({epochs:g} epoch(s) × "
                   f"{batches_per_epoch(args.num_examples, args.batch_size)} batches))")
        _check(math.isfinite(args.target_epsilon) and args.target_epsilon > 0, "--target-epsilon",
               args.target_epsilon, "a privacy budget epsilon > 0")
        _check(math.isfinite(args.delta) and 0 < args.delta < 1, "--delta", args.delta,
               "a probability in (0, 1), typically < 1/num-examples")
        _check(args.rounds >= 1, "--rounds", args.rounds, "an integer >= 1")

        rate = sample_rate_for(args.num_examples, args.batch_size)
        plan = plan_schedule(args.target_epsilon, args.delta, args.rounds, steps, rate, args.accountant,
                             cross_check=not args.no_cross_check, num_examples=args.num_examples)
        others = {}
        if args.compare:
            others = {name: plan_schedule(args.target_epsilon, args.delta, args.rounds, steps, rate, name,
                                          cross_check=False)
                      for name in ACCOUNTANTS}
        if args.json:
            out = plan.to_dict()
            if others:
                out["compare"] = {name: {"noise_multiplier": o.noise_multiplier, "final_epsilon": o.final_epsilon}
                                  for name, o in others.items()}
            print(json.dumps(out, indent=2))
            return 0
        print(format_plan(plan, how=how, batch_size=args.batch_size, num_examples=args.num_examples))
        if others:
            print(format_comparison(others))
        return 0


def format_plan(plan, *, how: str = "", batch_size: int | None = None, num_examples: int | None = None) -> str:
    """The plan as a readable table (what ``fedpriv plan`` prints)."""
    label = plan.accountant.upper()
    check = (plan.check_accountant or "").upper()
    checked = plan.check_accountant is not None
    lines = [
        f"Privacy plan: target ε = {plan.target_epsilon:g} at δ = {plan.delta:g} per region "
        f"(accountant: {label}{f', cross-check: {check}' if checked else ''})",
        "",
        f"  noise multiplier  {plan.noise_multiplier:.4f}   (σ search over all {plan.total_steps} steps, {label})",
        f"  sample rate       {plan.sample_rate:.5f}  (Poisson, 1 / ceil(N / B)"
        + (f"; batch {batch_size}, {num_examples} examples" if batch_size and num_examples else "")
        + ")",
        f"  schedule          {plan.rounds} round(s) × {how or f'{plan.steps_per_round} local steps'}",
        f"  final ε           {plan.final_epsilon:.3f} ({label})"
        + (f" / {plan.per_round[-1].epsilon_check:.3f} ({check})" if checked else ""),
        "",
    ]
    header = f"  {'round':>5}  {'steps':>6}  {'ε (' + label + ')':>9}"
    if checked:
        header += f"  {'ε (' + check + ')':>9}  {'diff':>7}"
    lines.append(header)
    for r in plan.per_round:
        row = f"  {r.round:>5}  {r.steps:>6}  {r.epsilon:>9.3f}"
        if checked:
            diff = "" if r.difference is None else f"{r.difference:+.1%}"
            row += f"  {r.epsilon_check:>9.3f}  {diff:>7}"
        lines.append(row)
    if checked:
        lines += ["", f"  diff = (ε_{label} − ε_{check}) / ε_{check}; positive means {label} is the more conservative."]
    for note in plan.warnings:
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def format_comparison(plans: dict) -> str:
    """σ each accountant needs for the same target and schedule (less σ for the same ε = a tighter accountant)."""
    lines = ["", "  accountant  noise multiplier  final ε"]
    for name, p in plans.items():
        lines.append(f"  {name:>10}  {p.noise_multiplier:>16.4f}  {p.final_epsilon:>7.3f}")
    return "\n".join(lines)


def _check(ok: bool, flag: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{flag} = {value!r}: expected {expected}")
