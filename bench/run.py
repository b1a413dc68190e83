"""The benchmark's command line: ``python -m bench [--quick] [--cases ...] [--contenders ...]``.

Runs every selected contender on every selected case, writes ``results.md``, ``results.json`` and
``speedup.png`` to the output folder, and prints the Markdown table. See bench/README.md.
"""

import argparse
import dataclasses
import datetime
import fnmatch
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `import bench` work
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from tqdm import tqdm

import fastreg
from bench import report
from bench.cases import (CASES, CASES_BY_NAME, float64_reference, has_groups, make_adam_second_moment, make_centers,
                         make_params)
from bench.contenders import (ADAM_GRAD_STD, FWD_BWD, GRAD_PASSES, LAMBDA, METRIC_PROX, PENALTIES, PROX, SETTINGS,
                              all_contenders, gradient_error, metric_prox_error, passes)
from bench.timing import FULL_BUDGET, QUICK_BUDGET, Budget, DeviceClock, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPILE_MAX_TENSORS = 200  # torch.compile of a 2000-tensor loop had not compiled after 14 minutes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time the seed article's penalty loops, PyTorch alternatives and every fastreg backend.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under a minute on 2 CPU cores): fewer repeats, L2 only, "
                             "no ResNet-50 / 100M cases unless --cases / --penalty name them")
    parser.add_argument("--cases", help="comma-separated case names (default: all; --quick: "
                        + ",".join(c.name for c in CASES if c.in_quick) + "); one of: "
                        + ", ".join(c.name for c in CASES))
    parser.add_argument("--contenders", help="comma-separated contender names or glob patterns, e.g. "
                        "'seed-loop,fastreg-*' (default: all; see --list)")
    parser.add_argument("--penalty", type=_penalties, default=None,
                        help="which penalties, comma-separated: l2, l1, group-rows, group-cols (group lasso + L2), "
                             "l2-center (toward reference weights), l2-2-settings, l2-10-settings (param groups in "
                             "one Penalty), metric-prox-l1, metric-prox-l2-center (one proximal step in Adam's metric), "
                             "both (l2 and l1) or all (default: all; --quick: l2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype (default fp32)")
    parser.add_argument("--grad-dtype", choices=("same", "fp32"), default="same",
                        help="dtype of p.grad: same as the parameter (default) or fp32 (fp32 gradient accumulation "
                             "for bf16/fp16 weights, via p.grad_dtype = None)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the loop, and report its compile time (slow)")
    parser.add_argument("--compile-max-tensors", type=int, default=COMPILE_MAX_TENSORS,
                        help=f"skip torch.compile on cases with more tensors (default {COMPILE_MAX_TENSORS})")
    parser.add_argument("--no-grad-check", action="store_true",
                        help="skip checking each contender's gradient (one extra fwd+bwd per contender)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameter values (default 0)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: bench/results/<device>-<dtype>-<YYYY-MM-DD> for a full run; "
                             "bench/results/local/... (git-ignored) for --quick and partial runs)")
    parser.add_argument("--list", action="store_true", help="list the cases and contenders, and exit")
    return parser.parse_args(argv)


def _penalties(text):
    """``--penalty``: one name, ``both``, ``all``, or names separated by commas."""
    if text in ("both", "all"):
        return text
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in PENALTIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown penalty {', '.join(unknown)}; choose from {', '.join(PENALTIES)}, "
                                         "both, all")
    return names


def select_cases(args):
    if not args.cases:
        return [c for c in CASES if c.in_quick or not args.quick]
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES_BY_NAME)}")
    return [CASES_BY_NAME[n] for n in names]


def select_contenders(args, contenders):
    if args.contenders:
        patterns = [p.strip() for p in args.contenders.split(",") if p.strip()]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in contenders)]
        if unmatched:
            sys.exit(f"no contender matches {', '.join(unmatched)}; "
                     f"contenders: {', '.join(c.name for c in contenders)}")
        contenders = [c for c in contenders if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    flags = {"--compile": args.compile}
    return [c for c in contenders if c.needs_flag is None or flags[c.needs_flag]]


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    return device


def default_out_dir(device, args):
    """Full runs write results to commit (bench/results/<device>-<dtype>-<date>); quick runs and
    partial runs (--cases / --contenders / --penalty) write under the git-ignored
    bench/results/local/, so a preview never overwrites committed results or dirties the tree."""
    date = datetime.date.today().isoformat()
    partial = args.quick or args.cases or args.contenders or args.penalty
    grads = "" if args.grad_dtype == "same" else f"-{args.grad_dtype}-grads"
    name = f"{report.device_slug(device)}-{args.dtype}{grads}{'-quick' if args.quick else ''}-{date}"
    return (RESULTS_DIR / "local" / name) if partial else (RESULTS_DIR / name)


@dataclasses.dataclass
class Session:
    """What every case and contender of one run shares."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    clock: DeviceClock
    budget: Budget
    progress: tqdm
    grad_dtype: torch.dtype | None = None  # None: p.grad in the parameter's dtype


def _row(case, penalty, contender, mode, params):
    numel = sum(p.numel() for p in params)
    itemsize = params[0].element_size()
    grad_itemsize = params[0].grad.element_size() if params[0].grad is not None else itemsize
    moves = passes(penalty, mode, contender.fwd_bwd_passes)
    grad_moves = GRAD_PASSES[mode] if moves else 0
    return {
        "case": case.name, "penalty": penalty, "contender": contender.name, "label": contender.label,
        "mode": mode, "is_baseline": contender.is_baseline,
        "numel": numel, "itemsize": itemsize, "passes": moves,
        "bytes": numel * ((moves - grad_moves) * itemsize + grad_moves * grad_itemsize),
        "median_ms": None, "times_ms": [], "warmup_calls": 0,
        "value": None, "reference_value": None, "rel_err": None, "grad_err": None, "prox_err": None,
        "setup_s": None, "skipped": None, "host_ms": None,
    }


def _skip_reason(contender, case, args):
    if contender.needs_flag == "--compile" and case.num_tensors > args.compile_max_tensors:
        return f"{case.num_tensors} tensors > --compile-max-tensors {args.compile_max_tensors}"
    return None


def _check(prepared, params, penalty, session, extras):
    """The value, the gradient error and the prox step's error; returns (value, {"grad_err": ...,
    "prox_err": ...}, calls already made per mode)."""
    prior_calls = {mode: 0 for mode in prepared.calls}
    value = grad_err = prox_err = None
    if prepared.value_mode is not None:
        value = float(prepared.calls[prepared.value_mode]().detach())
        prior_calls[prepared.value_mode] += 1
    if FWD_BWD in prepared.calls and not session.args.no_grad_check:
        with torch.no_grad():
            torch._foreach_zero_([p.grad for p in params])
        prepared.calls[FWD_BWD]()
        prior_calls[FWD_BWD] += 1
        session.clock.synchronize()
        grad_err = gradient_error(params, penalty, extras)
    if PROX in prepared.calls:  # one step from the case's weights, against the float64 step
        prepared.calls[PROX]()
        prior_calls[PROX] += 1
        session.clock.synchronize()
        if prepared.outputs is not None:
            prox_err = metric_prox_error(params, prepared.outputs, penalty, extras)
    return value, {"grad_err": grad_err, "prox_err": prox_err}, prior_calls


def _failure(exc):
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def run_contender(case, penalty, contender, params, reference, session, extras):
    """Check and time one contender in each of its modes; one row per mode.

    A contender that fails (a backend that cannot run these tensors, out of memory) is reported
    as skipped, with the reason, and the run goes on.
    """
    rows = [_row(case, penalty, contender, mode, params) for mode in contender.modes_for(penalty)]
    progress = session.progress
    reason = _skip_reason(contender, case, session.args)
    if reason is None:
        try:
            prepared = contender.prepare(params, penalty, session.clock, extras)
            value, errors, prior_calls = _check(prepared, params, penalty, session, extras)
        except Exception as exc:
            reason = _failure(exc)
    if reason is not None:
        for row in rows:
            row["skipped"] = reason
        progress.update(len(rows))
        return rows

    exact = LAMBDA * reference[penalty] if penalty in reference else None
    for row in rows:
        mode = row["mode"]
        progress.set_postfix_str(f"{case.name} {penalty} {contender.name} {mode}")
        if value is not None and exact is not None:
            row.update(value=value, reference_value=exact, rel_err=(value - exact) / exact if exact else None)
        row["setup_s"] = prepared.setup_s
        if mode == FWD_BWD:
            row["grad_err"] = errors["grad_err"]
        if mode == PROX:
            row["prox_err"] = errors["prox_err"]
        try:
            timing = measure(prepared.calls[mode], session.clock, session.budget, prior_calls[mode])
            row.update(median_ms=timing.median_ms, times_ms=timing.times_ms, warmup_calls=timing.warmup_calls,
                       host_ms=timing.median_host_ms)
        except Exception as exc:
            row["skipped"] = _failure(exc)
        progress.update()
    return rows


def run_case(case, penalties, contenders, session):
    """Every contender on one case: (rows, float64 reference). The parameters are freed afterwards."""
    session.progress.set_postfix_str(f"{case.name}: making {case.num_elements:,} parameters")
    params = make_params(case, session.dtype, session.device, session.args.seed)
    for p in params:  # the loss's gradient is already there when the penalty's backward runs
        if session.grad_dtype not in (None, p.dtype):
            p.grad_dtype = None  # a gradient of another dtype (torch >= 2.10): fp32 accumulation of bf16 weights
            p.grad = torch.zeros_like(p, dtype=session.grad_dtype)
        else:
            p.grad = torch.zeros_like(p)
    penalties = [p for p in penalties if applies(p, case)]
    seed = session.args.seed
    extras = {"centers": make_centers(params, seed) if {"l2-center", "metric-prox-l2-center"} & set(penalties) else None,
              "adam_v": make_adam_second_moment(params, seed, ADAM_GRAD_STD) if set(METRIC_PROX) & set(penalties)
              else None}
    reference = float64_reference(params, extras["centers"])
    rows = []
    for penalty in penalties:
        for contender in contenders:
            if penalty in contender.penalties:
                rows += run_contender(case, penalty, contender, params, reference, session, extras)
                gc.collect()
    del params, extras
    gc.collect()
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, reference


def applies(penalty, case):
    """The group terms need tensors with groups; the group and center terms run on the model cases."""
    if penalty in ("group-rows", "group-cols", "l2-center", "metric-prox-l2-center", *SETTINGS):
        return has_groups(case) and case.name in MODEL_CASES
    return True


MODEL_CASES = ("mlp", "resnet50", "gpt2")


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        print("cases:      " + ", ".join(f"{c.name} ({c.title})" for c in CASES))
        print("contenders: " + ", ".join(f"{c.name} ({c.label})" for c in all_contenders(fastreg.available_backends())))
        return 0
    device = resolve_device(args.device)
    which = args.penalty or (("l2",) if args.quick else "all")
    penalties = {"all": PENALTIES, "both": ("l2", "l1")}[which] if isinstance(which, str) else which
    contenders = select_contenders(args, all_contenders(fastreg.available_backends()))
    cases = select_cases(args)
    if not any(c.is_baseline for c in contenders):
        print("note: the seed loop is not selected: no speedups will be shown", file=sys.stderr)
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    out_dir = args.out or default_out_dir(device, args)
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = report.machine_info(device)
    meta.update(dtype=args.dtype, grad_dtype=args.grad_dtype, quick=args.quick, seed=args.seed, budget=dataclasses.asdict(budget),
                penalties=list(penalties), contenders=[c.name for c in contenders], case_runtime_s={})
    tasks = sum(len(c.modes_for(p)) for case in cases for p in penalties if applies(p, case)
                for c in contenders if p in c.penalties)
    rows, references = [], {}
    started = time.perf_counter()
    with tqdm(total=tasks, unit="timing", dynamic_ncols=True, file=sys.stderr) as progress:
        session = Session(args, device, DTYPES[args.dtype], DeviceClock(device), budget, progress,
                          grad_dtype=None if args.grad_dtype == "same" else torch.float32)
        for case in cases:
            case_started = time.perf_counter()
            case_rows, references[case.name] = run_case(case, penalties, contenders, session)
            rows += case_rows
            meta["case_runtime_s"][case.name] = round(time.perf_counter() - case_started, 1)
    meta["runtime_s"] = round(time.perf_counter() - started, 1)
    meta["load_average_at_end"] = report.load_average()

    report.add_derived(rows)
    table = report.markdown(rows, meta, cases, penalties)
    (out_dir / report.MARKDOWN_FILE).write_text(table)
    report.write_json(out_dir / report.JSON_FILE, meta, cases, references, rows)
    report.plot_speedups(out_dir / report.PLOT_FILE, rows, cases, penalties,
                         f"speedup vs the seed loop: {meta['device_name']}, {args.dtype}")
    print(table)
    print(f"done in {meta['runtime_s']} s; wrote {out_dir}/{{{report.MARKDOWN_FILE}, {report.JSON_FILE}, "
          f"{report.PLOT_FILE}}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
