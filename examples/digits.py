#!/usr/bin/env python
"""Prove it in training: L1 and L2 penalties on scikit-learn's handwritten digits.

    python examples/digits.py                 # the full run, writes examples/results/
    python examples/digits.py --quick         # a few epochs, for CI (seconds)

An MLP (64-256-256-10) that overfits the 8x8 digits (sklearn's bundled copy: nothing is
downloaded) is trained by mini-batch SGD from the same initial weights and the same batch
order in every run:

* no penalty;
* L2 as the widely copied tutorial writes it (a loop of ``torch.norm(p)**2``), with
  ``fastreg.Penalty(model, l2=...)``, and as ``weight_decay=fastreg.l2_to_weight_decay(l2)``:
  the three must take the same steps (checked: max parameter difference at the end);
* ``weight_decay = l2 / 2``, the tutorial's claim: a much weaker penalty (it does not match);
* L1 as the tutorial's loop of ``torch.abs(p).sum()`` and with ``fastreg.Penalty(model, l1=...)``
  (subgradient steps, same trajectory, and no exact zeros), and L1 by ``reg.prox_(lr)`` after
  ``optimizer.step()`` (proximal steps: exact zeros).

Penalty time per step is measured with ``time.perf_counter`` around the penalty's own work:
for a penalty in the loss, building the term and back-propagating it (``(term).backward()``
right after ``loss.backward()``, which accumulates into ``.grad`` exactly what one backward of
their sum would; the second backward call adds the autograd engine's fixed cost, a few tens of
µs, so these are upper bounds, the same for the tutorial loop and fastreg); for the prox run, the ``reg.prox_(lr)`` call. ``weight_decay`` happens
inside ``optimizer.step()``: its row shows the median step time minus the unpenalized run's.
The medians are over all steps of the run (CPU: every op is synchronous).

Outputs in ``--out``: ``digits.png`` (test accuracy and exact-zero fraction per epoch),
``results.md`` (the table), ``results.json`` (all numbers). Exits with status 1 if a check
fails.
"""

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastreg  # noqa: E402
from fastreg import sparsity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "examples" / "results"
QUICK_OUT = DEFAULT_OUT / "quick"  # git-ignored: a --quick run never overwrites the committed results


def shown(path):
    """``path`` relative to the repository when it is inside it (no local paths in the results)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Run:
    key: str
    label: str
    how: str  # "none", "loop", "fastreg", "weight_decay", "prox"
    l1: float = 0.0
    l2: float = 0.0
    weight_decay: float = 0.0


def make_runs(l1, l2):
    return [
        Run("none", "no penalty", "none"),
        Run("l2_loop", "L2, tutorial loop `torch.norm(p)**2`", "loop", l2=l2),
        Run("l2_fastreg", "L2, `fastreg.Penalty(l2=...)`", "fastreg", l2=l2),
        Run("l2_wd", "L2, `weight_decay=l2_to_weight_decay(l2)` (= 2·l2)", "weight_decay",
            weight_decay=fastreg.l2_to_weight_decay(l2)),
        Run("l2_wd_half", "L2, `weight_decay=l2/2` (the tutorial's claim)", "weight_decay",
            weight_decay=l2 / 2),
        Run("l1_loop", "L1, tutorial loop `torch.abs(p).sum()`", "loop", l1=l1),
        Run("l1_fastreg", "L1, `fastreg.Penalty(l1=...)` (subgradient)", "fastreg", l1=l1),
        Run("l1_prox", "L1, `reg.prox_(lr)` after `step()` (proximal)", "prox", l1=l1),
    ]


# Runs that must take the same steps: (run, reference).
SAME_TRAJECTORY = [("l2_loop", "l2_fastreg"), ("l2_wd", "l2_fastreg"), ("l1_loop", "l1_fastreg")]
DIFFERENT_TRAJECTORY = [("l2_wd_half", "l2_fastreg")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few epochs (CI smoke run)")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 (3 with --quick)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (default 0). With 0.9 in float32 the runs that must match "
                        "drift apart chaotically from 1-ulp differences (max |Δw| ~0.04 after 40 "
                        "epochs, measured); use --dtype float64 for that (~1e-14)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--l1", type=float, default=2e-3)
    p.add_argument("--l2", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: small ops, steadier timings on a shared machine; "
                        "0: torch's default)")
    p.add_argument("--backend", default="auto", help="fastreg backend (default: auto)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |Δw| allowed between runs that must match (default: 1e-4 for "
                        "float32, 1e-10 for float64)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {shown(DEFAULT_OUT)}; with --quick {shown(QUICK_OUT)}, git-ignored)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 40
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.tolerance is None:
        args.tolerance = 1e-4 if args.dtype == "float32" else 1e-10
    return args


def load_data(dtype, seed):
    """The 1,797 8x8 digits, a fixed stratified 75/25 split, standardized on the train part."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=dtype)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_model(hidden, dtype):
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    ).to(dtype)


def tutorial_l2(model, lambda_l2):
    """Example 1 of the tutorial, verbatim."""
    l2_reg = torch.tensor(0., requires_grad=True)
    for param in model.parameters():
        l2_reg = l2_reg + torch.norm(param)**2
    return lambda_l2 * l2_reg


def tutorial_l1(model, lambda_l1):
    """Example 2 of the tutorial, verbatim."""
    l1_reg = torch.tensor(0., requires_grad=True)
    for param in model.parameters():
        l1_reg = l1_reg + torch.abs(param).sum()
    return lambda_l1 * l1_reg


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def train(run, init_state, data, args, position):
    x_train, y_train, x_test, y_test = data
    dtype = x_train.dtype
    model = make_model(args.hidden, dtype)
    model.load_state_dict(init_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=run.weight_decay)
    if run.how == "loop":
        term = (lambda: tutorial_l2(model, run.l2)) if run.l2 else (lambda: tutorial_l1(model, run.l1))
    elif run.how == "fastreg":
        reg = fastreg.Penalty(model, l1=run.l1, l2=run.l2, backend=args.backend)
        term = reg
    else:
        term = None
    prox = fastreg.Penalty(model, l1=run.l1, l2=run.l2, backend=args.backend) if run.how == "prox" else None

    batches = torch.Generator().manual_seed(args.seed)  # the same batch order in every run
    n = len(x_train)
    penalty_s, step_s = [], []
    history = {"epoch": [], "test_acc": [], "zero_fraction": [], "train_loss": []}
    bar = tqdm(range(1, args.epochs + 1), desc=f"{run.key:<11}", position=position, leave=True,
               disable=None, dynamic_ncols=True)
    for epoch in bar:
        order = torch.randperm(n, generator=batches)
        losses = []
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            if term is not None:
                t0 = time.perf_counter()
                term().backward()
                penalty_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            optimizer.step()
            step_s.append(time.perf_counter() - t0)
            if prox is not None:
                t0 = time.perf_counter()
                prox.prox_(args.lr)
                penalty_s.append(time.perf_counter() - t0)
            losses.append(loss.item())
        zeros = sparsity(model).total_fraction
        test_acc = accuracy(model, x_test, y_test)
        history["epoch"].append(epoch)
        history["test_acc"].append(test_acc)
        history["zero_fraction"].append(zeros)
        history["train_loss"].append(statistics.fmean(losses))
        bar.set_postfix(test=f"{100 * test_acc:.1f}%", zeros=f"{100 * zeros:.1f}%")
    bar.close()

    s = sparsity(model)
    with torch.no_grad():
        sum_sq = fastreg.penalty(model, l2=1.0, backend=args.backend).item()
    return {
        "run": run.key,
        "label": run.label,
        "how": run.how,
        "l1": run.l1,
        "l2": run.l2,
        "weight_decay": run.weight_decay,
        "train_acc": accuracy(model, x_train, y_train),
        "test_acc": accuracy(model, x_test, y_test),
        "sum_sq": sum_sq,
        "zeros": s.zeros,
        "numel": s.numel,
        "zero_fraction": s.total_fraction,
        "penalty_us_median": 1e6 * statistics.median(penalty_s) if penalty_s else None,
        "penalty_us_mean": 1e6 * statistics.fmean(penalty_s) if penalty_s else None,
        "step_us_median": 1e6 * statistics.median(step_s),
        "steps": len(step_s),
        "history": history,
        "sparsity": s.to_dict(),
        "_sparsity": s,
        "_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def penalty_cell(result, results):
    if result["how"] == "weight_decay":
        extra = result["step_us_median"] - results["none"]["step_us_median"]
        return f"≈{extra:.0f} (in `step()`)"
    if result["penalty_us_median"] is None:
        return "–"
    return f"{result['penalty_us_median']:.0f}"


def markdown_table(results):
    lines = [
        "| run | train acc | test acc | Σw² | exact zeros | penalty µs/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['label']} | {100 * r['train_acc']:.1f}% | {100 * r['test_acc']:.1f}% | "
            f"{r['sum_sq']:.1f} | {100 * r['zero_fraction']:.1f}% ({r['zeros']:,}) | "
            f"{penalty_cell(r, results)} |"
        )
    return "\n".join(lines)


STYLES = {
    "none": dict(color="black", linestyle="-"),
    "l2_loop": dict(color="tab:blue", linestyle="-", linewidth=3, alpha=0.35),
    "l2_fastreg": dict(color="tab:blue", linestyle="--"),
    "l2_wd": dict(color="tab:blue", linestyle=":"),
    "l2_wd_half": dict(color="tab:cyan", linestyle="-."),
    "l1_loop": dict(color="tab:orange", linestyle="-", linewidth=3, alpha=0.35),
    "l1_fastreg": dict(color="tab:orange", linestyle="--"),
    "l1_prox": dict(color="tab:red", linestyle="-"),
}


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, zero_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in results.items():
        h = r["history"]
        style = STYLES.get(key, {})
        acc_ax.plot(h["epoch"], [100 * a for a in h["test_acc"]], label=r["label"].replace("`", ""), **style)
        zero_ax.plot(h["epoch"], [100 * z for z in h["zero_fraction"]], **style)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    zero_ax.set(xlabel="epoch", ylabel="exactly-zero parameters (%)", title="exact zeros")
    finals = [100 * r["test_acc"] for r in results.values()]
    acc_ax.set_ylim(max(0, min(finals) - 12), 100)
    for ax in (acc_ax, zero_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_png(fig, path)


def exit_status(checks):
    """0 when every check passed; else 1, after naming the failed ones on stderr."""
    failed = [c["check"] for c in checks if not c["ok"]]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def start(args):
    """The common start of an example's main(): threads and the output folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def save_png(fig, path):
    """Write ``fig`` to ``path`` and close it; a 64-colour palette keeps committed PNGs small."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    try:
        from PIL import Image

        buffer.seek(0)
        Image.open(buffer).convert("RGB").quantize(64).save(path, optimize=True)
    except ImportError:
        Path(path).write_bytes(buffer.getvalue())


def main(argv=None):
    args = parse_args(argv)
    start(args)
    dtype = getattr(torch, args.dtype)

    data = load_data(dtype, args.seed)
    torch.manual_seed(args.seed)
    init_state = make_model(args.hidden, dtype).state_dict()
    runs = make_runs(args.l1, args.l2)
    n_params = sum(v.numel() for v in init_state.values())
    explained = fastreg.Penalty(make_model(args.hidden, dtype), l2=1.0, backend=args.backend).explain()
    backend_line = "backend=" + explained.splitlines()[-1].split("backend=", 1)[1]
    setup = (f"digits: {len(data[0])} train / {len(data[2])} test, MLP 64-{args.hidden}-{args.hidden}-10 "
             f"({n_params:,} parameters, {args.dtype}), SGD lr={args.lr} momentum={args.momentum}, "
             f"batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; l1={args.l1:g}, l2={args.l2:g}")
    print(setup)
    print(f"fastreg {fastreg.__version__} ({backend_line}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    train_start = time.perf_counter()
    results = {}
    for position, run in enumerate(runs):
        results[run.key] = train(run, init_state, data, args, position)
    train_s = time.perf_counter() - train_start

    checks = []
    for a, b in SAME_TRAJECTORY:
        diff = max_difference(results[a]["_state"], results[b]["_state"])
        checks.append({"check": f"{a} == {b}", "max_abs_diff": diff, "ok": diff <= args.tolerance})
    for a, b in DIFFERENT_TRAJECTORY:
        diff = max_difference(results[a]["_state"], results[b]["_state"])
        checks.append({"check": f"{a} != {b}", "max_abs_diff": diff, "ok": diff > args.tolerance})
    prox_zeros = results["l1_prox"]["zeros"]
    checks.append({"check": "l1_prox has exact zeros", "zeros": prox_zeros, "ok": prox_zeros > 0})
    for key in ("l1_loop", "l1_fastreg"):
        checks.append({"check": f"{key} (subgradient) has no exact zeros", "zeros": results[key]["zeros"],
                       "ok": results[key]["zeros"] == 0})

    table = markdown_table(results)
    prox_table = results["l1_prox"]["_sparsity"].table()
    print()
    print(table)
    print()
    print(f"fastreg.sparsity.sparsity(model) after the prox run:\n{prox_table}")
    print()
    print("max |Δw| at the end (same seed, same batches):")
    for c in checks:
        detail = f"{c['max_abs_diff']:.3g}" if "max_abs_diff" in c else f"{c['zeros']:,} zeros"
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']:<44} {detail}")

    note = (f"Penalty µs/step: median over all steps of the penalty term's forward + its own "
            f"`backward()` (loss-penalty runs; same method for the tutorial loop and fastreg), or of "
            f"the `prox_` call (prox run); for `weight_decay`, median `step()` time minus the "
            f"no-penalty run's. Σw² and exact zeros over all {n_params:,} parameters (biases "
            f"included, as in the tutorial's loop).")
    if not args.no_plot:
        plot(results, args.out / "digits.png", setup)
    total_s = time.perf_counter() - _START
    (args.out / "results.md").write_text(
        f"{setup}\n\n{table}\n\n{note}\n\n"
        f"Exact zeros per parameter after the prox run (`fastreg.sparsity.sparsity(model)`):\n\n"
        f"```\n{prox_table}\n```\n\n"
        + "\n".join(f"- {c['check']}: " + (f"max |Δw| = {c['max_abs_diff']:.3g}" if "max_abs_diff" in c
                                           else f"{c['zeros']:,} exact zeros") for c in checks)
        + f"\n\nfastreg {fastreg.__version__} ({backend_line}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}; training {train_s:.1f} s, "
          f"whole script {total_s:.1f} s.\n"
    )
    (args.out / "results.json").write_text(json.dumps({
        "setup": setup,
        "args": {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "backend": backend_line,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_seconds": train_s,
        "total_seconds": total_s,
        "checks": checks,
        "results": {k: {kk: vv for kk, vv in r.items() if not kk.startswith("_")} for k, r in results.items()},
    }, indent=1))
    print(f"\nwrote {shown(args.out)}/results.md, results.json" + ("" if args.no_plot else ", digits.png")
          + f"; training {train_s:.1f} s, total {total_s:.1f} s")
    return exit_status(checks)


if __name__ == "__main__":
    sys.exit(main())
