"""The ``lvforecast`` console command (also ``python -m lvforecast``): flops, budget, simulate, sweeps.

Options: ``--help`` and docs/budget.md#commands. The parser imports only standard-library-only modules, so
``lvforecast flops`` never imports torch (``flops --audit``, which runs a model, does). Bad input prints one
``error: ...`` line to stderr and exits 2 for bad arguments, 1 for a missing ledger or a refused operation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from lvforecast.errors import TRACEBACK_SWITCH, UserError, print_user_error

if TYPE_CHECKING:
    from lvforecast.budget.formulas import Breakdown
    from lvforecast.budget.shapes import Conventions, LoRASpec, ModelShape


def _add_flops(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lvforecast.budget.shapes import BUILTIN, HEADS, AttentionWidth, Conventions, MaskForm, NormForm, RopeForm

    p = sub.add_parser("flops", help="analytic FLOPs of a forward or training step (no weights loaded)",
                       description="Analytic FLOPs of a forward or training step (no weights loaded); with --audit, "
                       "the FLOPs of one real forward of a random-init model beside them.")
    p.add_argument("--model", default="qwen2.5-0.5b",
                   help=f"built-in ({', '.join(BUILTIN)}) or a Hugging Face config.json / its directory")
    p.add_argument("--seq-len", type=int, default=512, help="padded positions N per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences B per batch")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0: no adapter)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated wrapped projections")
    p.add_argument("--logit-bias", action="store_true", help="count the trainable output-logit bias")
    p.add_argument("--mode", choices=("forward", "train"), default="forward", help="train = 3 x forward")
    for key, form in (("attention", AttentionWidth), ("mask", MaskForm), ("rope", RopeForm), ("norm", NormForm)):
        p.add_argument(f"--{key}", choices=get_args(form), default=None, help=f"default {getattr(Conventions(), key)}")
    p.add_argument("--implemented", action="store_true",
                   help="defaults as Hugging Face eager runs: gqa, additive, rotate_half, rsqrt")
    p.add_argument("--loss", action="store_true", help="count the cross-entropy loss")
    p.add_argument("--head", choices=HEADS, default="full",
                   help="output head (model.head): full vocabulary, or only the 13 LLMTIME characters' rows")
    p.add_argument("--audit", action="store_true",
                   help="also run one forward of a random-init model of --model (eager attention, nothing "
                   "downloaded), price every op it runs and print that beside the analytic count (as-implemented "
                   "conventions); exits 1 when they differ")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.set_defaults(handler=_flops, parser=p)


def _flops_spec(args: argparse.Namespace) -> tuple[ModelShape, LoRASpec | None, Conventions]:
    """``(shape, lora, conventions)`` of the ``flops`` arguments; a bad value or combination raises, named."""
    from lvforecast.budget.shapes import ALPHABET_SIZE, Conventions, LoRASpec, resolve_shape

    for key, value, low in (("--lora-rank", args.lora_rank, 0), ("--seq-len", args.seq_len, 1),
                            ("--batch", args.batch, 1)):
        if value < low:
            raise UserError(f"{key}={value!r}: must be an integer >= {low}")
    shape = resolve_shape(args.model)
    switches = {k: v for k in ("attention", "mask", "rope", "norm") if (v := getattr(args, k)) is not None}
    given = {**switches, **({"mode": args.mode} if args.mode != "forward" else {})}
    if args.audit and given:
        raise UserError(f"{', '.join(f'--{k} {v}' for k, v in given.items())}: --audit measures one forward "
                        "against the as-implemented conventions (what the eager forward runs); "
                        f"drop {'them' if len(given) > 1 else 'it'}")
    base = Conventions.as_implemented() if args.implemented or args.audit else Conventions()
    conv = dataclasses.replace(base, count_loss=args.loss, **switches)
    if not (args.lora_rank or args.logit_bias or args.head != "full"):
        return shape, None, conv
    if not args.lora_rank:  # the bias and the head belong to the fine-tuning module, beside an adapter
        raise UserError("--logit-bias needs --lora-rank >= 1 (the bias trains beside an adapter)" if args.logit_bias
                        else "--head alphabet needs --lora-rank >= 1 (the alphabet head is the fine-tuning "
                        "module's, beside an adapter)")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return shape, LoRASpec(rank=args.lora_rank, targets=targets, logit_bias=args.logit_bias,
                           head_rows=ALPHABET_SIZE if args.head == "alphabet" else None), conv


def _flops(args: argparse.Namespace) -> int:
    """Print the breakdown table (or JSON) of one forward or training step; with ``--audit``, :func:`_audit`."""
    from lvforecast.budget.formulas import forward_flops, train_step_flops

    try:
        shape, lora, conv = _flops_spec(args)
        count = train_step_flops if args.mode == "train" else forward_flops
        result = count(shape, args.batch, args.seq_len, lora, conv)
    except ValueError as err:
        args.parser.error(str(err))
    if args.audit:
        return _audit(args, result, lora)
    print(json.dumps({"model": args.model, **result.to_json()}, indent=2) if args.json
          else result.table(f"{args.model} {result.label}, B={args.batch} N={args.seq_len}"))
    return 0


def _audit(args: argparse.Namespace, analytic: Breakdown, lora: LoRASpec | None) -> int:
    """Print the audited forward beside ``analytic``; 0 when they agree and every op was priced, else 1."""
    from lvforecast.budget.audit import audit_architecture, compare
    from lvforecast.budget.shapes import resolve_config

    audited = audit_architecture(resolve_config(args.model), args.batch, args.seq_len, lora,
                                 analytic.conventions.count_loss)
    counts = {"analytic": analytic.as_dict(), "audited": audited.components}
    names = list(dict.fromkeys([*counts["analytic"], *counts["audited"]]))
    differ = list(compare(counts["audited"], counts["analytic"]))
    if args.json:
        report = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
                  "conventions": dataclasses.asdict(analytic.conventions),
                  **{side: {"total": sum(c.values()), "components": c} for side, c in counts.items()},
                  "differ": differ, "free": audited.free, "unpriced": dict(audited.unpriced)}
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        width = max(len(n) for n in [*names, "component"])
        lines = [f"{args.model} forward, B={args.batch} N={args.seq_len}: audited (random init, eager) vs analytic",
                 f"conventions: {analytic.conventions.describe()}",
                 f"{'component':<{width}}  {'audited':>22}  {'analytic':>22}  {'audited - analytic':>20}"]
        rows = [(n, counts["audited"].get(n, 0), counts["analytic"].get(n, 0)) for n in names]
        for name, aud, ana in [*rows, ("total", audited.total, analytic.total)]:
            lines.append(f"{name:<{width}}  {aud:>22,}  {ana:>22,}  {aud - ana:>20,}")
        lines += [f"free (priced, not charged): {name} {flops:,}" for name, flops in audited.free.items()]
        lines += [f"unpriced: {op} x{calls}" for op, calls in audited.unpriced.items()]
        sys.stdout.write("\n".join(lines) + "\n")
    problems = [f"the audit and the analytic count differ on {', '.join(differ)}"] if differ else []
    problems += [f"ops without a price ran ({', '.join(audited.unpriced)})"] if audited.unpriced else []
    if problems:
        print(f"error: {'; '.join(problems)}: the formulas do not describe what {args.model} runs", file=sys.stderr)
        return 1
    return 0


def _add_budget(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lvforecast.budget.ledger import DEFAULT_LEDGER, LEDGER_ENV, STALE_AFTER_S
    from lvforecast.budget.store import JOURNAL_ENV, JOURNAL_MODES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", type=Path, default=None,
                        help=f"ledger file (default: ${LEDGER_ENV} or {DEFAULT_LEDGER})")
    common.add_argument("--journal-mode", default=os.environ.get(JOURNAL_ENV) or None, metavar="MODE",
                        help=f"SQLite journal mode, one of {', '.join(JOURNAL_MODES)} (default: ${JOURNAL_ENV}, "
                        "else keep the file's mode)")
    common.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    common.set_defaults(handler=_budget)  # each action's parser takes it over
    p = sub.add_parser("budget", help="the study's FLOP budget ledger: report, reconcile, show",
                       description="The study's FLOP budget ledger.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    rep = actions.add_parser("report", parents=[common], help="per-run spend table + bar chart (Table 12)")
    rep.add_argument("--out", type=Path, default=None,
                     help="directory for report.md and budget_report.png (default: the ledger's directory)")
    rep.add_argument("--since", metavar="WHEN", default=None,
                     help="list only runs started at or after WHEN: a date (2025-01-31) or ISO time "
                          "(2025-01-31T14:30, local time unless it has an offset); totals stay the whole ledger's")
    rep.add_argument("--stage", metavar="STAGE", default=None,
                     help="list only runs of STAGE: a stage name, study/stage, or '(no stage)'")
    rep.set_defaults(parser=rep)
    rec = actions.add_parser("reconcile", parents=[common],
                             help="mark runs with dead owners crashed and release their reservations")
    rec.add_argument("--run", type=int, action="append", default=[], metavar="ID",
                     help="also mark this running run crashed (runs of other machines); repeatable")
    rec.add_argument("--stale-after", type=float, default=STALE_AFTER_S, metavar="SECONDS",
                     help="a --run must have committed nothing for this long (default: %(default).0f)")
    rec.add_argument("--force", action="store_true",
                     help="release the --run runs however recently they committed (a live one stops at its next "
                          "commit, its FLOPs since the last one uncharged)")
    actions.add_parser("show", parents=[common], help="list runs, their owners and the remaining budget")


def _budget(args: argparse.Namespace) -> int:
    """``budget report|reconcile|show``: 0 on success, 1 when the ledger is missing or an operation is refused."""
    from lvforecast.budget.ledger import Ledger, default_ledger_path, format_flops
    from lvforecast.budget.report import format_report_markdown, format_runs, write_report_files
    from lvforecast.budget.status import RunStatus
    from lvforecast.budget.view import parse_since, select

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.action == "report" and args.since is not None:
        try:  # a bad --since is a bad argument, found before the ledger is opened
            parse_since(args.since)
        except UserError as err:
            args.parser.error(str(err))
    ledger = Ledger(args.ledger or default_ledger_path(), budget=None, journal_mode=args.journal_mode)
    if args.action == "report":
        try:
            report = select(ledger.report(), args.since, args.stage)
        except UserError as err:  # an unknown --stage: the message lists the ledger's stages
            args.parser.error(str(err))
        md, png = write_report_files(report, args.out if args.out is not None else ledger.path.parent)
        if args.json:
            print(json.dumps({**report, "files": {"markdown": str(md), "png": str(png)}}, indent=2))
        else:
            print(format_report_markdown(report), end="")
            print(f"wrote {md} and {png}", file=sys.stderr)
    elif args.action == "reconcile":
        ids, remaining = ledger.reconcile(args.run, args.stale_after, args.force), ledger.remaining()
        print(json.dumps({RunStatus.CRASHED: ids, "remaining": remaining}) if args.json
              else f"marked crashed: {', '.join(map(str, ids)) or 'none'}; remaining {format_flops(remaining)}")
    else:
        runs = ledger.runs()
        if args.json:
            print(json.dumps({"ledger": str(ledger.path), "budget": ledger.budget, "remaining": ledger.remaining(),
                              "runs": runs}, indent=2))
        else:
            print(format_runs(ledger, runs), end="")
    return 0


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="simulate Rosenzweig-MacArthur trajectories to HDF5",
                       description="Simulate Rosenzweig-MacArthur predator-prey trajectories to HDF5.")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.add_argument("--systems", type=int, default=1000, help="number of systems N")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=100, help="time steps T")
    p.add_argument("--t-end", type=float, default=200.0, help="last sample time")
    p.set_defaults(handler=_simulate, parser=p)


def _check_simulation_fits(systems: int, steps: int) -> None:
    """UserError before allocating when the simulation cannot fit in the memory available: it holds (N, T, 2)
    float64 twice (the solution and its clipped copy) and the float32 file values."""
    need = max(systems, 0) * max(steps, 0) * 2 * (8 + 8 + 4)
    have = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError, KeyError):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        have = int(meminfo["MemAvailable"].split()[0]) * 1024
    if have is not None and need > have:
        raise UserError(f"--systems {systems} --steps {steps}: needs about {need / 2**30:.1f} GiB of memory to "
                        f"simulate, {have / 2**30:.1f} GiB is available; simulate fewer systems (several files "
                        f"with different --seed) or on a machine with more memory")


def _simulate(args: argparse.Namespace) -> int:
    """Simulate, write the file and print ``PATH (N, T, 2) SECONDSs``."""
    from lvforecast.data.simulate import write_simulation
    from lvforecast.data.trajectories import TrajectoryFileError

    _check_simulation_fits(args.systems, args.steps)
    start = time.perf_counter()
    try:
        out, traj = write_simulation(args.out, args.systems, args.seed, n_steps=args.steps, t_end=args.t_end)
    except TrajectoryFileError:
        raise  # --out cannot be written: main prints one error block naming the path, status 1
    except ValueError as err:
        args.parser.error(str(err))  # a bad argument: exits with status 2 and the one-line reason
    print(f"{out} {traj.values.shape} {time.perf_counter() - start:.2f}s")
    return 0


def _add_sweeps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sweeps", help="sweep tools: summarize", description="Tools for Hydra multirun sweeps.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    summ = actions.add_parser("summarize", help="(re)write a sweep's summary from its job directories",
                              description="(Re)write a sweep's summary from its job directories and print it.")
    summ.add_argument("sweep_dir", help="the multirun's directory")
    summ.set_defaults(handler=_sweeps_summarize, parser=summ)


def _sweeps_summarize(args: argparse.Namespace) -> int:
    """0 when every job finished, 1 when some did not."""
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        args.parser.error(f"sweep_dir={str(sweep_dir)!r}: no such directory")
    from lvforecast.experiment.sweeps.summary import summarize_command

    return summarize_command(sweep_dir)


def build_parser() -> argparse.ArgumentParser:
    """The ``lvforecast`` parser with its subcommands (imports only pure, standard-library modules)."""
    parser = argparse.ArgumentParser(prog="lvforecast",
                                     description="LoRA Lotka-Volterra forecasters under a FLOP budget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_flops, _add_budget, _add_simulate, _add_sweeps):
        add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``lvforecast`` subcommand with ``argv`` (default ``sys.argv[1:]``) and return its exit status:
    1 with one ``error:`` block for a user error (:mod:`lvforecast.errors`); bad arguments raise ``SystemExit(2)``."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:
        print_user_error(exc, full_traceback=os.environ.get(TRACEBACK_SWITCH) == "1")
        return 1
