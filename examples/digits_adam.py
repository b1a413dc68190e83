#!/usr/bin/env python
"""Exact sparsity under Adam: L1 and group lasso on the digits MLP, the proximal step in Adam's
own metric against the Euclidean one and against L1 in the loss.

    python examples/digits_adam.py            # the full run, writes examples/results/adam/
    python examples/digits_adam.py --quick    # CI (writes examples/results/quick/adam/, git-ignored)

The digits MLP of ``examples/digits.py`` (64-256-256-10) trained by Adam from the same initial
weights and batch order, five ways: no penalty; L1 in the loss (``loss + reg()``: subgradients,
no exact zeros); L1 by ``attach(optimizer, mode="prox", metric="euclidean")`` (threshold
``lr·l1`` per step: under Adam a gradient-reweighted lasso); L1 by ``attach(optimizer,
mode="prox")`` (Adam's metric: threshold ``lr·l1/D``, whose fixed points solve loss + l1·Σ|w|);
and group lasso on the hidden layers' rows in Adam's metric (whole neurons to zero). Reported:
test accuracy, exact-zero weights, zero neurons, and the penalty ``l1·Σ|w|`` at the end, each as
measured (including where the metric step does not win).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402  (the data and the model of the digits example)

import fastreg  # noqa: E402

ROOT = digits.ROOT
DEFAULT_OUT = ROOT / "examples" / "results" / "adam"
QUICK_OUT = ROOT / "examples" / "results" / "quick" / "adam"
HIDDEN_WEIGHTS = ["0.weight", "2.weight"]

RUNS = [
    ("none", "no penalty"),
    ("loss", "L1 in the loss (`loss + reg()`)"),
    ("euclidean", "L1, Euclidean prox (`metric='euclidean'`)"),
    ("metric", "L1, prox in Adam's metric (`attach(mode='prox')`)"),
    ("group", "group lasso on hidden rows, prox in Adam's metric"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="default 30 (6 with --quick)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=1e-4, help="L1 coefficient (of the mean cross-entropy)")
    p.add_argument("--group", type=float, default=2e-3, help="group lasso coefficient (hidden rows)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.epochs = args.epochs or (6 if args.quick else 30)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def train(key, init_state, data, args):
    x_train, y_train, x_test, y_test = data
    model = digits.make_model(args.hidden, x_train.dtype)
    model.load_state_dict(init_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    hidden = [(n, p) for n, p in model.named_parameters() if n in HIDDEN_WEIGHTS]
    reg = None
    if key == "loss":
        reg = fastreg.Penalty(hidden, l1=args.l1, backend=args.backend)
    elif key in ("euclidean", "metric"):
        fastreg.Penalty(hidden, l1=args.l1, backend=args.backend).attach(
            optimizer, mode="prox", metric="euclidean" if key == "euclidean" else "optimizer")
    elif key == "group":
        fastreg.Penalty(hidden, group=args.group, group_dim=0, backend=args.backend).attach(optimizer, mode="prox")
    order = torch.Generator().manual_seed(args.seed)
    for _ in tqdm(range(args.epochs), desc=f"{key:<9}", disable=None, dynamic_ncols=True):
        perm = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(x_train), args.batch_size):
            idx = perm[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            (loss + reg() if reg is not None else loss).backward()
            optimizer.step()
    s = fastreg.sparsity(hidden, group_dim=0)
    l1_value = sum(p.detach().abs().sum().item() for _, p in hidden) * args.l1
    return {"test_acc": digits.accuracy(model, x_test, y_test), "zero_weights": s.zeros, "weights": s.numel,
            "zero_neurons": s.zero_groups, "neurons": s.groups, "l1_value": l1_value}


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    digits.start(args)
    data = digits.load_data(torch.float32, args.seed)
    torch.manual_seed(args.seed)
    init_state = digits.make_model(args.hidden, torch.float32).state_dict()
    setup = (f"digits: MLP 64-{args.hidden}-{args.hidden}-10, Adam lr={args.lr}, batch {args.batch_size}, "
             f"{args.epochs} epochs, seed {args.seed}; l1={args.l1:g}, group={args.group:g} on {', '.join(HIDDEN_WEIGHTS)}")
    print(setup)
    results = {key: {"label": label, **train(key, init_state, data, args)} for key, label in RUNS}
    lines = ["| run | test acc | exact-zero hidden weights | zero hidden neurons | l1·Σ\\|w\\| at the end |",
             "|---|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r['label']} | {100 * r['test_acc']:.1f}% | {100 * r['zero_weights'] / r['weights']:.1f}% | "
                     f"{r['zero_neurons']} of {r['neurons']} | {r['l1_value']:.4f} |")
    table = "\n".join(lines)
    print("\n" + table)
    checks = [("L1 in the loss gives no exact zeros", results["loss"]["zero_weights"] == 0),
              ("the prox in Adam's metric gives exact zeros", results["metric"]["zero_weights"] > 0),
              ("group lasso in Adam's metric zeroes whole neurons", results["group"]["zero_neurons"] > 0)]
    for name, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - start
    (args.out / "results.md").write_text(f"{setup}\n\n{table}\n\n" + "\n".join(
        f"- {name}: {'ok' if ok else 'FAILED'}" for name, ok in checks)
        + f"\n\nfastreg {fastreg.__version__}, torch {torch.__version__}; {total:.1f} s.\n")
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results,
                                                       "checks": [{"check": n, "ok": ok} for n, ok in checks]},
                                                      indent=1))
    print(f"wrote {digits.shown(args.out)}/results.md, results.json")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
