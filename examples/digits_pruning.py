#!/usr/bin/env python
"""Structured sparsity in training: group lasso zeroes whole neurons, which are then cut out.

    python examples/digits_pruning.py            # the full run, writes examples/results/pruning/
    python examples/digits_pruning.py --quick    # a few epochs (CI; writes examples/results/quick/pruning/)

The digits MLP of ``examples/digits.py`` (64-256-256-10, scikit-learn's bundled 8x8 digits,
nothing downloaded) is trained by mini-batch SGD from the same initial weights and batch order
three times, each followed after every ``optimizer.step()`` by a proximal step:

* no penalty;
* **group lasso** on the rows of the two hidden layers' weights (``group_dim=0``: a row is one
  neuron's input weights), ``reg.prox_(lr)``: whole rows become exactly zero;
* **L1** on the same weights, ``reg.prox_(lr)``: many single weights become zero, few rows;
* **coupled neuron groups** (``coupled=``): each hidden neuron's incoming row *and its bias*
  (and, for the last hidden layer, its outgoing column of the output layer) form one group,
  so a neuron reaches zero as a whole and outputs exactly 0. (The first layer's outgoing
  columns are rows of the second layer's neurons: groups that overlap have no closed-form
  proximal step, so fastreg refuses them, and the coupling stops at row + bias there.)

A neuron whose weight row is zero outputs a constant, ``relu(b_i)``. The script then **removes**
every such neuron: it folds the constant into the next layer's bias
(``b' = b_next + W_next[:, i] * relu(b_i)``) and slices the rows of that layer and the columns of
the next one out. It checks that the smaller dense model predicts exactly the same classes on
the test set (its logits within float rounding), and reports parameters, test accuracy and
inference time (batched, median of many runs, one thread) before and after, with a figure of test
accuracy and zero neurons per epoch. Exits with status 1 if a check fails.
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
import digits  # noqa: E402  (the data and the model of the digits example)

import fastreg  # noqa: E402

ROOT = digits.ROOT
DEFAULT_OUT = ROOT / "examples" / "results" / "pruning"
QUICK_OUT = ROOT / "examples" / "results" / "quick" / "pruning"  # git-ignored
HIDDEN_WEIGHTS = ["0.weight", "2.weight"]  # the rows of these are the hidden neurons
# One group per hidden neuron: its row and bias, and for the last hidden layer its output column.
COUPLED = [[("0.weight", 0), ("0.bias", 0)], [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few epochs (CI smoke run)")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 (12 with --quick: neurons start to go at ~10)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--group", type=float, default=0.025, help="group lasso coefficient λg (rows of hidden layers)")
    p.add_argument("--l1", type=float, default=2e-3, help="L1 coefficient of the comparison run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--timing-repeats", type=int, default=None, help="inference timings (default 300; 20 quick)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {digits.shown(DEFAULT_OUT)}; --quick: {digits.shown(QUICK_OUT)})")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 12 if args.quick else 40
    if args.timing_repeats is None:
        args.timing_repeats = 20 if args.quick else 300
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


RUNS = [
    ("none", "no penalty", {}),
    ("group", "group lasso on hidden rows + `prox_`", {"group": None, "group_dim": 0}),
    ("l1", "L1 on hidden weights + `prox_`", {"l1": None}),
    ("coupled", "group lasso on coupled neurons (row + bias [+ out column]) + `prox_`", {"group": None,
                                                                                        "coupled": COUPLED}),
]


def zero_neurons(model):
    """Exactly-zero rows (neurons) of each hidden weight, via fastreg.sparsity."""
    s = fastreg.sparsity([(n, dict(model.named_parameters())[n]) for n in HIDDEN_WEIGHTS], group_dim=0)
    return s


def train(key, terms, init_state, data, args, position):
    x_train, y_train, x_test, y_test = data
    model = digits.make_model(args.hidden, x_train.dtype)
    model.load_state_dict(init_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    reg = None
    if terms:
        kwargs = {k: (args.group if k == "group" else args.l1 if k == "l1" else v) for k, v in terms.items()}
        names = {n for coupling in terms.get("coupled", ()) for n, _ in coupling} or set(HIDDEN_WEIGHTS)
        hidden = [(n, p) for n, p in model.named_parameters() if n in names]
        reg = fastreg.Penalty(hidden, **kwargs, backend=args.backend)
    order_rng = torch.Generator().manual_seed(args.seed)  # the same batch order in every run
    history = {"epoch": [], "test_acc": [], "zero_neurons": [], "zero_weights": []}
    prox_s = []
    bar = tqdm(range(1, args.epochs + 1), desc=f"{key:<6}", position=position, disable=None, dynamic_ncols=True)
    for epoch in bar:
        order = torch.randperm(len(x_train), generator=order_rng)
        for start in range(0, len(x_train), args.batch_size):
            idx = order[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            if reg is not None:
                t0 = time.perf_counter()
                reg.prox_(args.lr)
                prox_s.append(time.perf_counter() - t0)
        s = zero_neurons(model)
        history["epoch"].append(epoch)
        history["test_acc"].append(digits.accuracy(model, x_test, y_test))
        history["zero_neurons"].append(s.zero_groups)
        history["zero_weights"].append(s.zeros)
        bar.set_postfix(test=f"{100 * history['test_acc'][-1]:.1f}%", zero_neurons=s.zero_groups)
    bar.close()
    return model, history, prox_s


def prune(model):
    """A smaller dense copy of ``model`` without the neurons whose weight row is zero.

    Their constant output relu(b_i) is folded into the next layer's bias, so the function is
    unchanged (up to the rounding of that addition).
    """
    layers = [m for m in model if isinstance(m, nn.Linear)]
    weights = [layer.weight.detach().clone() for layer in layers]
    biases = [layer.bias.detach().clone() for layer in layers]
    for k in range(len(layers) - 1):
        keep = weights[k].ne(0).any(dim=1)
        dropped = ~keep
        if dropped.any():  # the constant outputs of the dropped neurons go into the next bias
            biases[k + 1] += weights[k + 1][:, dropped] @ torch.relu(biases[k][dropped])
        weights[k], biases[k] = weights[k][keep], biases[k][keep]
        weights[k + 1] = weights[k + 1][:, keep]
    modules = []
    for k, (w, b) in enumerate(zip(weights, biases)):
        linear = nn.Linear(w.shape[1], w.shape[0]).to(w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        modules.append(linear)
        if k < len(weights) - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def inference_ms(model, x, repeats):
    with torch.no_grad():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def count(model):
    return sum(p.numel() for p in model.parameters())


def plot(histories, labels, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, zero_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"none": "black", "group": "tab:green", "l1": "tab:red", "coupled": "tab:blue"}
    for key, h in histories.items():
        acc_ax.plot(h["epoch"], [100 * a for a in h["test_acc"]], color=colors[key], label=labels[key].replace("`", ""))
        zero_ax.plot(h["epoch"], h["zero_neurons"], color=colors[key])
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    zero_ax.set(xlabel="epoch", ylabel="hidden neurons with an exactly-zero weight row",
                title="zero neurons (of 2 x hidden)")
    finals = [100 * h["test_acc"][-1] for h in histories.values()]
    acc_ax.set_ylim(max(0, min(finals) - 10), 100)
    for ax in (acc_ax, zero_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    digits.save_png(fig, path)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    digits.start(args)
    data = digits.load_data(torch.float32, args.seed)
    x_test, y_test = data[2], data[3]
    torch.manual_seed(args.seed)
    init_state = digits.make_model(args.hidden, torch.float32).state_dict()
    setup = (f"digits: {len(data[0])} train / {len(x_test)} test, MLP 64-{args.hidden}-{args.hidden}-10, SGD "
             f"lr={args.lr}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; group={args.group:g} "
             f"(rows of {', '.join(HIDDEN_WEIGHTS)}), l1={args.l1:g}; prox_(lr) after every step")
    print(setup)

    results, histories, labels, checks = {}, {}, {}, []
    for position, (key, label, terms) in enumerate(RUNS):
        model, history, prox_s = train(key, terms, init_state, data, args, position)
        small = prune(model)
        with torch.no_grad():
            logits, small_logits = model(x_test), small(x_test)
        same = bool(torch.equal(logits.argmax(1), small_logits.argmax(1)))
        logit_diff = (logits - small_logits).abs().max().item()
        s = zero_neurons(model)
        zero_rows = [w.detach().eq(0).all(dim=1) for w in (model[0].weight, model[2].weight)]
        zero_bias = sum(int(b.detach()[rows].ne(0).sum()) for b, rows in zip((model[0].bias, model[2].bias),
                                                                            zero_rows))
        results[key] = {
            "removed_neurons_with_nonzero_bias": zero_bias,
            "label": label,
            "test_acc": digits.accuracy(model, x_test, y_test),
            "pruned_test_acc": digits.accuracy(small, x_test, y_test),
            "zero_neurons": s.zero_groups, "neurons": s.groups,
            "per_layer": [row._asdict() for row in s.per_group],
            "zero_weights": s.zeros, "hidden_weights": s.numel,
            "params": count(model), "pruned_params": count(small),
            "hidden_sizes": [m.out_features for m in small if isinstance(m, nn.Linear)][:-1],
            "inference_ms": inference_ms(model, x_test, args.timing_repeats),
            "pruned_inference_ms": inference_ms(small, x_test, args.timing_repeats),
            "same_predictions": same, "max_logit_difference": logit_diff,
            "prox_us_median": 1e6 * statistics.median(prox_s) if prox_s else None,
            "history": history,
        }
        histories[key], labels[key] = history, label
        checks.append({"check": f"{key}: the pruned model predicts the same classes", "ok": same,
                       "max_logit_difference": logit_diff})
        checks.append({"check": f"{key}: logits within float rounding", "ok": logit_diff < 1e-4,
                       "max_logit_difference": logit_diff})
    checks.append({"check": "group lasso zeroes whole neurons", "ok": results["group"]["zero_neurons"] > 0})
    checks.append({"check": "L1 zeroes more single weights than whole neurons",
                   "ok": results["l1"]["zero_weights"] > args.hidden * results["l1"]["zero_neurons"]})
    checks.append({"check": "coupled groups zero whole neurons, biases included (nothing to fold)",
                   "ok": results["coupled"]["zero_neurons"] > 0
                   and results["coupled"]["removed_neurons_with_nonzero_bias"] == 0})

    header = ("| run | test acc | zero hidden neurons | of them with a nonzero bias (folded) | zero hidden weights | "
              "parameters | after pruning | hidden sizes | test acc after | inference ms before / after | "
              "same predictions |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in results.values():
        lines.append(
            f"| {r['label']} | {100 * r['test_acc']:.1f}% | {r['zero_neurons']} of {r['neurons']} | "
            f"{r['removed_neurons_with_nonzero_bias']} | "
            f"{100 * r['zero_weights'] / r['hidden_weights']:.1f}% | {r['params']:,} | {r['pruned_params']:,} "
            f"({100 * r['pruned_params'] / r['params']:.0f}%) | {'-'.join(map(str, r['hidden_sizes']))} | "
            f"{100 * r['pruned_test_acc']:.1f}% | {r['inference_ms']:.3f} / {r['pruned_inference_ms']:.3f} | "
            f"{'yes' if r['same_predictions'] else 'NO'} (max |Δlogit| {r['max_logit_difference']:.1e}) |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    for c in checks:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}")
    if not args.no_plot:
        plot(histories, labels, args.out / "pruning.png", setup)
    total = time.perf_counter() - start
    note = (f"Inference: the whole test set ({len(x_test)} images) in one batch, median of {args.timing_repeats} "
            f"runs, {torch.get_num_threads()} thread(s). Pruning removes the hidden neurons whose weight row is "
            "exactly zero and folds their constant output relu(b) into the next layer's bias.")
    (args.out / "results.md").write_text(f"{setup}\n\n{table}\n\n{note}\n\n"
                                         + "\n".join(f"- {c['check']}: {'ok' if c['ok'] else 'FAILED'}" for c in checks)
                                         + f"\n\nfastreg {fastreg.__version__}, torch {torch.__version__}; "
                                           f"{total:.1f} s.\n")
    (args.out / "results.json").write_text(json.dumps({
        "setup": setup, "args": {k: digits.shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checks": checks, "results": results, "seconds": total}, indent=1))
    print(f"wrote {digits.shown(args.out)}/results.md, results.json" + ("" if args.no_plot else ", pruning.png"))
    return digits.exit_status(checks)


if __name__ == "__main__":
    sys.exit(main())
