#!/usr/bin/env python
"""Fine-tuning with a penalty toward the pretrained weights (L2-SP) vs weight decay vs nothing.

    python examples/digits_finetune.py           # the full run, writes examples/results/finetune/
    python examples/digits_finetune.py --quick   # CI (writes examples/results/quick/finetune/)

Li, Grandvalet & Davoine (2018) show that when fine-tuning, pulling the weights toward their
pretrained values ``w⁰`` (``α/2·‖w − w⁰‖²``, L2-SP) beats plain weight decay, which pulls them
toward 0 and forgets the pretraining. This script measures it on a small transfer task, honestly:

* **pretrain** the digits MLP body (64-256-256) with a 5-way head on digits 0-4 (all their
  training images);
* **fine-tune** the body and a new 5-way head on digits 5-9 from only ``--shots`` images per
  class (a few-shot task), three ways, each with several coefficients:
  no penalty; L2 toward 0 (``fastreg.Penalty(model, l2=α)``, i.e. weight decay); L2-SP
  (``fastreg.Penalty(model, l2=α, center={"body.*": pretrained body weights})``: the body toward
  its pretrained weights, the new head — absent from the mapping — toward 0, with the same α);
  and L2-SP as the paper (and TLlib) use it, body and head at their own strengths, in one
  Penalty with two param groups::

      fastreg.Penalty([{"params": model.body, "l2": α, "center": pretrained.body.state_dict()},
                       {"params": model.head, "l2": β}])

  whose two values (``handle.last_values``) are logged separately;
* report, over ``--seeds`` draws of the few-shot set: test accuracy on digits 5-9 (the new
  task), test accuracy on digits 0-4 with the fine-tuned body and the *old* head (what the body
  still knows), and ``‖w − w⁰‖`` of the body; with a figure.

Every run starts from the same pretrained weights; within a seed, every method sees the same
few-shot images in the same order.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402  (the data of the digits example)

import fastreg  # noqa: E402

ROOT = digits.ROOT
DEFAULT_OUT = ROOT / "examples" / "results" / "finetune"
QUICK_OUT = ROOT / "examples" / "results" / "quick" / "finetune"  # git-ignored
OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer seeds, coefficients and steps (CI)")
    p.add_argument("--shots", type=int, default=10, help="training images per new class (default 10)")
    p.add_argument("--seeds", type=int, default=None, help="few-shot draws (default 8; 2 with --quick)")
    p.add_argument("--alphas", type=float, nargs="+", default=None,
                   help="penalty coefficients (default 1e-3 1e-2 1e-1; 1e-2 with --quick)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 30 (5 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300; 60 with --quick)")
    p.add_argument("--beta", type=float, default=0.01, help="the head's L2 in the paper's L2-SP (default 0.01, "
                   "the paper's β)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {digits.shown(DEFAULT_OUT)}; --quick: {digits.shown(QUICK_OUT)})")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or (2 if quick else 8)
    args.alphas = args.alphas or ([1e-2] if quick else [1e-3, 1e-2, 1e-1])
    args.pretrain_epochs = args.pretrain_epochs or (5 if quick else 30)
    args.steps = args.steps or (60 if quick else 300)
    args.out = args.out or (QUICK_OUT if quick else DEFAULT_OUT)
    return args


class Net(nn.Module):
    """The digits MLP as a body and a 5-way head."""

    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 5)

    def forward(self, x):
        return self.head(self.body(x))


def subset(x, y, classes):
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep] - classes[0]  # labels 0..4 within the task


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def pretrain(data, args):
    x_train, y_train, x_test, y_test = data
    x, y = subset(x_train, y_train, OLD)
    torch.manual_seed(0)
    model = Net(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(args.pretrain_epochs):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), 32):
            idx = perm[start:start + 32]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model


def few_shot(x, y, shots, seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    picks = []
    for label in range(5):
        where = torch.nonzero(y == label).flatten()
        picks.append(where[torch.randperm(len(where), generator=generator)[:shots]])
    idx = torch.cat(picks)
    return x[idx], y[idx]


def finetune(pretrained, method, alpha, train, args, seed):
    """A copy of the pretrained body with a new head, fine-tuned on the few-shot set."""
    model = Net(args.hidden)
    model.body.load_state_dict(pretrained.body.state_dict())
    torch.manual_seed(2000 + seed)
    model.head.reset_parameters()  # the new task's head (the same draw for every method)
    if method == "l2":
        reg = fastreg.Penalty(model, l2=alpha, backend=args.backend)
    elif method == "l2-sp":
        # The body toward its pretrained weights; the new head is not in the mapping: toward 0.
        reg = fastreg.Penalty(model, l2=alpha, center={f"body.{k}": v for k, v in pretrained.body.state_dict().items()},
                              backend=args.backend)
    elif method == "l2-sp-beta":
        # The paper's recipe: the body toward w⁰ with α, the new head toward 0 with its own β.
        reg = fastreg.Penalty([{"params": model.body, "l2": alpha, "center": pretrained.body.state_dict()},
                               {"params": model.head, "l2": args.beta}], backend=args.backend)
    else:
        reg = None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    handle = None
    if reg is not None:
        handle = reg.attach(optimizer)  # the penalty's gradient is added inside every step
    x, y = train
    order = torch.Generator().manual_seed(3000 + seed)
    batch = min(25, len(x))
    for _ in range(args.steps):
        idx = torch.randperm(len(x), generator=order)[:batch]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.penalty_values = None if handle is None else [v.item() for v in handle.last_values.values()]
    return model


def distance(body, pretrained_body):
    with torch.no_grad():
        return sum(((a - b) ** 2).sum() for a, b in zip(body.parameters(), pretrained_body.parameters())).sqrt().item()


def summary(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"none": "black", "l2": "tab:blue", "l2-sp": "tab:green", "l2-sp-beta": "tab:olive"}
    labels = [r["label"] for r in results]
    for ax, key, name in zip(axes, ("new_acc", "old_acc", "distance"),
                             ("test accuracy, digits 5-9 (new task)", "test accuracy, digits 0-4 (old head)",
                              "‖w − w⁰‖ of the body")):
        means = [100 * r[key]["mean"] if key != "distance" else r[key]["mean"] for r in results]
        stds = [100 * r[key]["std"] if key != "distance" else r[key]["std"] for r in results]
        ax.bar(range(len(results)), means, yerr=stds, color=[colors[r["method"]] for r in results], alpha=0.8,
               capsize=3)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if key != "distance":
            low = min(m - s for m, s in zip(means, stds))
            ax.set_ylim(max(0, low - 5), 100)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    digits.save_png(fig, path)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    digits.start(args)
    data = digits.load_data(torch.float32, 0)
    x_train, y_train, x_test, y_test = data
    new_train = subset(x_train, y_train, NEW)
    new_test, old_test = subset(x_test, y_test, NEW), subset(x_test, y_test, OLD)
    pretrained = pretrain(data, args)
    pretrained_old_acc = accuracy(pretrained, *old_test)
    setup = (f"digits: pretrain body 64-{args.hidden}-{args.hidden} + 5-way head on digits 0-4 "
             f"({args.pretrain_epochs} epochs, test acc {100 * pretrained_old_acc:.1f}%); fine-tune body + new head on "
             f"digits 5-9 from {args.shots} images per class, {args.steps} SGD steps (lr {args.lr}, momentum 0.9, "
             f"batch 25), {args.seeds} few-shot draws; penalties applied with reg.attach(optimizer)")
    print(setup)
    configs = [("none", None)] + [(m, a) for m in ("l2", "l2-sp", "l2-sp-beta") for a in args.alphas]
    results = []
    for method, alpha in tqdm(configs, desc="methods", disable=None, dynamic_ncols=True):
        new_acc, old_acc, dist, values = [], [], [], []
        for seed in range(args.seeds):
            model = finetune(pretrained, method, alpha, few_shot(*new_train, args.shots, seed), args, seed)
            values.append(model.penalty_values)
            new_acc.append(accuracy(model, *new_test))
            old_model = Net(args.hidden)  # the fine-tuned body with the pretrained head
            old_model.body.load_state_dict(model.body.state_dict())
            old_model.head.load_state_dict(pretrained.head.state_dict())
            old_acc.append(accuracy(old_model, *old_test))
            dist.append(distance(model.body, pretrained.body))
        label = {"none": "no penalty", "l2": f"L2 toward 0, α={alpha}", "l2-sp": f"L2-SP toward w⁰, α={alpha}",
                 "l2-sp-beta": f"L2-SP, body α={alpha} toward w⁰, head β={args.beta} toward 0"}[method]
        last = [v for v in values if v is not None]
        results.append({"method": method, "alpha": alpha, "label": label, "new_acc": summary(new_acc),
                        "old_acc": summary(old_acc), "distance": summary(dist),
                        # each param group's penalty at the last step, averaged over the seeds
                        "last_values": [statistics.fmean(v) for v in zip(*last)] if last else None})

    lines = ["| fine-tuning | test acc, digits 5-9 (new) | test acc, digits 0-4 (old head) | ‖w − w⁰‖ (body) | "
             "penalty at the last step (per param group) |",
             "|---|---:|---:|---:|---|"]
    for r in results:
        shown = " / ".join(f"{v:.3g}" for v in r["last_values"]) if r["last_values"] else "-"
        lines.append(f"| {r['label']} | {100 * r['new_acc']['mean']:.1f}% ± {100 * r['new_acc']['std']:.1f} | "
                     f"{100 * r['old_acc']['mean']:.1f}% ± {100 * r['old_acc']['std']:.1f} | "
                     f"{r['distance']['mean']:.2f} ± {r['distance']['std']:.2f} | {shown} |")
    table = "\n".join(lines)
    best = {m: max((r for r in results if r["method"] == m), key=lambda r: r["new_acc"]["mean"])
            for m in ("none", "l2", "l2-sp", "l2-sp-beta")}
    verdict = (f"Best of each (by new-task accuracy): no penalty {100 * best['none']['new_acc']['mean']:.1f}%, "
               f"L2 {100 * best['l2']['new_acc']['mean']:.1f}% (α={best['l2']['alpha']:g}), "
               f"L2-SP {100 * best['l2-sp']['new_acc']['mean']:.1f}% (α={best['l2-sp']['alpha']:g}), "
               f"L2-SP with the head at β={args.beta:g} {100 * best['l2-sp-beta']['new_acc']['mean']:.1f}% "
               f"(α={best['l2-sp-beta']['alpha']:g}); "
               f"old-task accuracy with the old head: {100 * best['none']['old_acc']['mean']:.1f}% / "
               f"{100 * best['l2']['old_acc']['mean']:.1f}% / {100 * best['l2-sp']['old_acc']['mean']:.1f}% / "
               f"{100 * best['l2-sp-beta']['old_acc']['mean']:.1f}% "
               f"(pretrained: {100 * pretrained_old_acc:.1f}%). ± is the standard deviation over the few-shot draws.")
    print("\n" + table + "\n\n" + verdict)
    if not args.no_plot:
        plot(results, args.out / "finetune.png", setup)
    total = time.perf_counter() - start
    (args.out / "results.md").write_text(f"{setup}\n\n{table}\n\n{verdict}\n\nfastreg {fastreg.__version__}, "
                                         f"torch {torch.__version__}; {total:.1f} s.\n")
    (args.out / "results.json").write_text(json.dumps({
        "setup": setup, "args": {k: digits.shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pretrained_old_acc": pretrained_old_acc, "results": results, "seconds": total}, indent=1))
    print(f"wrote {digits.shown(args.out)}/results.md, results.json" + ("" if args.no_plot else ", finetune.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
