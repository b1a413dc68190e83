"""``python -m bench.step``: what a penalty costs inside a real training step.

The penalty-only benchmark (``python -m bench``) times the penalty alone; this one times whole
steps — ``zero_grad(set_to_none=True)``, forward, a task loss that reaches every parameter,
backward, ``optimizer.step()`` — on real models (``bench/models.py``: a transformer LM with a tied
head, a CNN, the seed article's MLP), and reports the **time each way of regularizing adds to a
step**, against the same step without a penalty:

* the seed article's loops (L2 ``torch.norm(p)**2``, L1 ``torch.abs(p).sum()``), ``_foreach_norm``;
* fastreg: ``loss + reg()`` with a ``Penalty`` built once, the one-call ``fastreg.penalty(model,
  ...)``, ``reg.add_to_grad_()`` after ``backward()``, ``reg.attach(optimizer)``;
* the optimizers' own ``weight_decay``: SGD and AdamW, ``foreach=True`` and ``fused=True``
  (each against the same optimizer without decay).

Method. Every contender runs in its own worker process (its own allocator, its own page faults:
what a user's training process feels), with the same model, weights and batch; only one works at
a time, and idle workers' OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``). After warm-up
rounds, each round asks every contender for one step, in an order rotated from round to round;
the added time is the median over rounds of (the contender's step - the step without a penalty
that the same process takes right next to it, in alternating order), with the interquartile
range of those paired differences as the spread, in wall-clock and in the process's CPU time.
(Pairing across processes — a contender's step minus the baseline process's — is reported too,
as ``added_across_processes_ms`` in results.json: each process's own allocator and page faults
make that difference noisier than a penalty's cost on a CPU.)

    python -m bench.step            # full: LM, CNN, MLP; writes bench/results/step-<device>-<date>/
    python -m bench.step --quick    # small models, few rounds (CI); writes bench/results/local/

Outputs: ``results.md`` (a table per model), ``headline.md`` (the README's opening table: what
each way adds per step, with its spread), ``results.json`` (every step time), ``step.png``.
"""

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
L2, L1 = 1e-4, 1e-5
ADAMW_DECAY = 1e-2


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    optimizer: str  # "sgd", "sgd-fused", "adamw", "adamw-fused"
    method: str  # "none", "seed-l2", "seed-l1", "foreach-norm", "autograd", "one-call", "add-to-grad", "attach",
    #              "weight-decay"


CONTENDERS = [
    Contender("none", "no penalty (SGD, foreach)", "sgd", "none"),
    Contender("seed-l2", "seed loop L2: loss + λ·Σ torch.norm(p)**2", "sgd", "seed-l2"),
    Contender("seed-l1", "seed loop L1: loss + λ·Σ torch.abs(p).sum()", "sgd", "seed-l1"),
    Contender("foreach-norm", "loss + λ·Σ torch._foreach_norm(ps)²", "sgd", "foreach-norm"),
    Contender("autograd", "fastreg: loss + reg()", "sgd", "autograd"),
    Contender("one-call", "fastreg: loss + fastreg.penalty(model, l2=λ)", "sgd", "one-call"),
    Contender("add-to-grad", "fastreg: reg.add_to_grad_() after backward()", "sgd", "add-to-grad"),
    Contender("attach", "fastreg: reg.attach(optimizer)", "sgd", "attach"),
    Contender("sgd-wd", "SGD weight_decay (foreach)", "sgd", "weight-decay"),
    Contender("none-sgd-fused", "no penalty (SGD, fused)", "sgd-fused", "none"),
    Contender("sgd-fused-wd", "SGD weight_decay (fused)", "sgd-fused", "weight-decay"),
    Contender("none-adamw", "no penalty (AdamW, foreach)", "adamw", "none"),
    Contender("adamw-wd", "AdamW weight_decay (foreach)", "adamw", "weight-decay"),
    Contender("none-adamw-fused", "no penalty (AdamW, fused)", "adamw-fused", "none"),
    Contender("adamw-fused-wd", "AdamW weight_decay (fused)", "adamw-fused", "weight-decay"),
]
BASELINE = {c.optimizer: c.name for c in CONTENDERS if c.method == "none"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, 6 rounds (a CI smoke run)")
    parser.add_argument("--models", help="comma-separated: lm, cnn, mlp, gpt2 (default: all)")
    parser.add_argument("--contenders", help="comma-separated contender names (default: all; baselines are added)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 25; --quick 6)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; --quick 2)")
    parser.add_argument("--profiled", type=int, default=None,
                        help="profiled steps per contender and model after the timed rounds, whose time the "
                             "profiler attributes to the penalty (default 5; --quick 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/step-<device>-<date>; "
                                                 "--quick and partial runs: bench/results/local/...)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (6 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.profiled = args.profiled if args.profiled is not None else (1 if args.quick else 5)
    return args


# ------------------------------------------------------------------------------------------
# The worker: one contender, one model at a time, one step per request


def _optimizer(kind, params, decay):
    if kind.startswith("sgd"):
        options = dict(lr=1e-3, momentum=0.9, weight_decay=2 * L2 if decay else 0.0)
    else:
        options = dict(lr=1e-3, weight_decay=ADAMW_DECAY if decay else 0.0)
    options.update(fused=True) if kind.endswith("fused") else options.update(foreach=True)
    return (torch.optim.SGD if kind.startswith("sgd") else torch.optim.AdamW)(params, **options)


def _build(contender, spec, device):
    import fastreg

    model, batch = spec.make(device)
    params = list(model.parameters())
    optimizer = _optimizer(contender.optimizer, params, contender.method == "weight-decay")
    reg = fastreg.Penalty(model, l2=L2)
    method = contender.method
    extra = None
    if method == "seed-l2":
        def extra():
            l2_reg = torch.tensor(0., requires_grad=True, device=device)
            for param in model.parameters():
                l2_reg = l2_reg + torch.norm(param) ** 2
            return L2 * l2_reg
    elif method == "seed-l1":
        def extra():
            l1_reg = torch.tensor(0., requires_grad=True, device=device)
            for param in model.parameters():
                l1_reg = l1_reg + torch.abs(param).sum()
            return L1 * l1_reg
    elif method == "foreach-norm":
        def extra():
            return L2 * torch.stack(torch._foreach_norm(params)).pow(2).sum()
    elif method == "autograd":
        extra = reg
    elif method == "one-call":
        def extra():
            return fastreg.penalty(model, l2=L2)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decay = [group["weight_decay"] for group in optimizer.param_groups]
    attached = []

    def switch(on):
        """The contender's way on, or off (this process's own step without a penalty)."""
        if method == "attach" and on != bool(attached):
            attached.append(reg.attach(optimizer)) if on else attached.pop().remove()
        if method == "weight-decay":
            for group, value in zip(optimizer.param_groups, decay):
                group["weight_decay"] = value if on else 0.0

    def one_step(on, ranged=contextlib.nullcontext):
        """A step; ``ranged()`` encloses the penalty's own calls (a profiler range when profiled)."""
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        if on and extra is not None:
            with ranged():
                penalty = extra()
            loss = loss + penalty
        loss.backward()
        if on and method == "add-to-grad":
            with ranged():
                reg.add_to_grad_()
        optimizer.step()

    def timed(on):
        switch(on)
        synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        one_step(on)
        synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    def profiled():
        """The contender's step and the step without it, each under the profiler: the time the
        profiler attributes to the penalty inside the step (``attribute``)."""
        from torch.profiler import ProfilerActivity, profile, record_function

        events = []
        for on in (True, False):
            switch(on)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                one_step(on, lambda: record_function(PENALTY_RANGE))
            events.append(prof.events())
        return attribute(*events)

    calls = [0]

    def step(profile=False):
        """``(wall, cpu)`` of a step with the contender's way, then of this process's step without
        it, taken back to back (in alternating order)."""
        if profile:
            return profiled()
        calls[0] += 1
        if calls[0] % 2:
            with_it = timed(True)
            return (*with_it, *timed(False))
        without = timed(False)
        return (*timed(True), *without)

    return step


def _worker(conn, contender, size, device_name, threads):
    from bench.models import MODELS

    specs = {spec.name: spec for spec in MODELS[size]}
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    current, step = None, None
    while True:
        request = conn.recv()
        if request is None:
            break
        profile = isinstance(request, tuple)  # ("profile", model): an attributed step
        model = request[1] if profile else request
        if model != current:
            step = None
            step = _build(contender, specs[model], device)
            current = model
        try:
            conn.send(("ok", step(profile)))
        except Exception as exc:  # reported in the table, not fatal
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:300]))
    conn.close()


# ------------------------------------------------------------------------------------------
# What the profiler attributes to the penalty inside a step: resolvable where a difference of
# two steps is not (this VM's step-to-step noise is larger than most penalties' cost).

PENALTY_RANGE = "bench::penalty"  # encloses extra() / add_to_grad_() in a profiled step
FASTREG_RANGES = ("fastreg::deferred_add_grad", "fastreg::attach")  # fastreg's own, outside any op of ours
EVALUATE = "autograd::engine::evaluate_function: "
ACCUMULATE = ("aten::add_", "aten::add")


def attribute(events, baseline):
    """ms of a step's time that is the penalty's, from its profiler events (``baseline``: the
    same process's step without it): the penalty's calls (the range around them); the backward
    of every autograd node they created (matched by sequence number); fastreg's own ranges (the
    deferred addition at the end of the backward, an optimizer hook); and the engine's
    accumulation of the penalty's gradients into the task's (the additions inside the task's
    nodes, less those of the step without the penalty). An optimizer's weight_decay runs inside
    its own ops and is not attributable: None for it."""
    ranges = [e for e in events if e.name == PENALTY_RANGE]
    inside = [e for e in events if e.sequence_nr >= 0 and not e.name.startswith(EVALUATE)
              and any(r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end for r in ranges)]
    sequence = {e.sequence_nr for e in inside}
    calls = sum(e.cpu_time_total for e in ranges)
    nodes = sum(e.cpu_time_total for e in events if e.name.startswith(EVALUATE) and e.sequence_nr in sequence)
    own = sum(e.cpu_time_total for e in events if e.name in FASTREG_RANGES)
    accumulation = max(0.0, _accumulation(events, sequence) - _accumulation(baseline, set()))
    return {"calls_ms": calls / 1e3, "backward_nodes_ms": nodes / 1e3, "fastreg_ranges_ms": own / 1e3,
            "accumulation_ms": accumulation / 1e3, "total_ms": (calls + nodes + own + accumulation) / 1e3}


def _accumulation(events, penalty_sequence):
    """µs of additions run directly inside the backward nodes that are not the penalty's (where
    the engine adds two gradients of one tensor)."""
    return sum(child.cpu_time_total for e in events
               if e.name.startswith(EVALUATE) and e.sequence_nr not in penalty_sequence
               for child in e.cpu_children if child.name in ACCUMULATE)


# ------------------------------------------------------------------------------------------
# The harness


def _quantile(values, q):
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def analyse(times, contenders, attributed=None):
    """Per contender: median step (ms), added time vs its baseline (paired per round), spread, share;
    and the median of what the profiler attributes to it (``attribute``), with its range."""
    rows = []
    for c in contenders:
        mine = times.get(c.name)
        base = times.get(BASELINE[c.optimizer])
        row = {"name": c.name, "label": c.label, "optimizer": c.optimizer, "method": c.method,
               "baseline": BASELINE[c.optimizer], "error": None}
        if isinstance(mine, str) or isinstance(base, str):
            row["error"] = mine if isinstance(mine, str) else f"baseline: {base}"
            rows.append(row)
            continue
        wall, cpu = [t[0] for t in mine], [t[1] for t in mine]
        base_wall = [t[0] for t in base]
        # Paired inside the contender's own process: its step with the way, minus its step without
        # it taken next to it (another process's baseline differs by its own allocator and page
        # faults, which on a CPU is more than a penalty costs).
        added = [1e3 * (t[0] - t[2]) for t in mine]
        added_cpu = [1e3 * (t[1] - t[3]) for t in mine]
        across = [1e3 * (a - b) for a, b in zip(wall, base_wall)]
        row.update(step_ms=1e3 * statistics.median(wall), baseline_ms=1e3 * statistics.median(base_wall),
                   added_across_processes_ms=statistics.median(across),
                   added_ms=statistics.median(added), added_q25_ms=_quantile(added, 0.25),
                   added_q75_ms=_quantile(added, 0.75), times_s=wall, cpu_times_s=cpu,
                   added_cpu_ms=statistics.median(added_cpu), added_cpu_q25_ms=_quantile(added_cpu, 0.25),
                   added_cpu_q75_ms=_quantile(added_cpu, 0.75), passes=PASSES.get(c.method))
        row["share"] = row["added_ms"] / row["baseline_ms"] if row["baseline_ms"] else None
        profiled = (attributed or {}).get(c.name) or []
        if profiled and c.method not in ("none", "weight-decay"):  # (weight_decay: inside the optimizer's ops)
            totals = [a["total_ms"] for a in profiled]
            row.update(attributed_ms=statistics.median(totals), attributed_min_ms=min(totals),
                       attributed_max_ms=max(totals), attributed_parts={
                           key: statistics.median(a[key] for a in profiled) for key in profiled[0] if key != "total_ms"})
        rows.append(row)
    return rows


# Passes over the parameters' bytes each way makes in a step, beyond the step without a penalty
# (a pass: one read or one write of every parameter-sized tensor). seed loops: the forward reads
# w; the backward reads w and writes each term's gradient, which the engine adds into p.grad (read
# both, write); fastreg's autograd mode: the forward's read of w, then at the end of the backward
# one add_grad_ (read w, read and write g) where the deferred backward applies (through the graph,
# as the seed loops, elsewhere); add_to_grad_ / attach: read w, read and write g; weight_decay: the
# optimizer reads w once more (foreach: and reads and writes g; fused: inside its own pass).
PASSES = {"seed-l2": 6, "seed-l1": 6, "foreach-norm": 6, "autograd": 4, "one-call": 4, "add-to-grad": 3,
          "attach": 3, "weight-decay": 3}


def targets(rows):
    """The issue's targets, as ratios of added times within one run (wall clock, the CPU time of
    the step's process, and the in-step time the profiler attributes to each way). A ratio whose denominator is not positive (inside the noise) is
    reported as n/a, not met: the target is listed either way."""
    by = {r["name"]: r for r in rows if r.get("added_ms") is not None}

    def check(target, mine, theirs, key, limit):
        if mine not in by or theirs not in by:
            return None
        numerator, denominator = by[mine].get(key), by[theirs].get(key)
        if numerator is None or denominator is None:
            return None
        ratio = numerator / denominator if denominator > 0 else None
        return {"target": target, "ratio": ratio, "met": ratio is not None and ratio <= limit}

    checks = [
        check("fastreg autograd adds <= 1.2x what add_to_grad_ adds (wall)", "autograd", "add-to-grad", "added_ms", 1.2),
        check("fastreg autograd adds <= 1.2x what add_to_grad_ adds (CPU)", "autograd", "add-to-grad", "added_cpu_ms",
              1.2),
        check("fastreg autograd adds <= 1/5 of what the seed loop (L2) adds", "autograd", "seed-l2", "added_ms", 0.2),
        check("fastreg autograd adds <= 1/5 of what the seed loop (L2) adds (CPU)", "autograd", "seed-l2",
              "added_cpu_ms", 0.2),
        check("fastreg autograd's in-step time <= 1.2x add_to_grad_'s (profiler)", "autograd", "add-to-grad",
              "attributed_ms", 1.2),
        check("fastreg autograd's in-step time <= 1/5 of the seed loop's (L2, profiler)", "autograd", "seed-l2",
              "attributed_ms", 0.2),
        check("add_to_grad_ adds <= 1.5x what SGD's foreach weight_decay adds", "add-to-grad", "sgd-wd", "added_ms",
              1.5),
    ]
    return [c for c in checks if c is not None]


def run(args):
    from bench.models import MODELS

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    specs = {spec.name: spec for spec in MODELS["quick" if args.quick else "full"]}
    models = [m.strip() for m in args.models.split(",")] if args.models else list(specs)
    contenders = CONTENDERS
    if args.contenders:
        wanted = {n.strip() for n in args.contenders.split(",")}
        chosen = [c for c in CONTENDERS if c.name in wanted]
        wanted |= {BASELINE[c.optimizer] for c in chosen}
        contenders = [c for c in CONTENDERS if c.name in wanted]
    # An idle worker's OpenMP threads must not spin while another worker's step runs (the
    # default wait policy busy-waits after every parallel region, stealing the cores).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fastreg", "bench.models"])
    workers = {}
    for c in contenders:
        parent, child = context.Pipe()
        size = "quick" if args.quick else "full"
        process = context.Process(target=_worker, args=(child, c, size, str(device), args.threads), daemon=True)
        process.start()
        workers[c.name] = (parent, process)
    results = {}
    total = len(models) * (args.rounds + args.warmup + args.profiled) * len(contenders)
    try:
        with tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr) as progress:
            for model in models:
                times = {c.name: [] for c in contenders}
                for r in range(args.warmup + args.rounds):
                    order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                    for c in order:
                        progress.set_postfix_str(f"{model} {c.name}")
                        if isinstance(times[c.name], str):  # it failed once: skipped from then on
                            progress.update()
                            continue
                        conn = workers[c.name][0]
                        conn.send(model)
                        status, value = conn.recv()
                        if status != "ok":
                            times[c.name] = value
                        elif r >= args.warmup:
                            times[c.name].append(value)
                        progress.update()
                attributed = {c.name: [] for c in contenders}
                for _ in range(args.profiled):
                    for c in contenders:
                        progress.set_postfix_str(f"{model} {c.name} (profiled)")
                        if not isinstance(times[c.name], str):
                            conn = workers[c.name][0]
                            conn.send(("profile", model))
                            status, value = conn.recv()
                            if status == "ok":
                                attributed[c.name].append(value)
                        progress.update()
                results[model] = {"title": specs[model].title, "rows": analyse(times, contenders, attributed)}
                results[model]["targets"] = targets(results[model]["rows"])
    finally:
        for conn, process in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=10)
    return device, models, results


def _attributed(row):
    if row.get("attributed_ms") is None:
        return "–"
    return f"{_ms(row['attributed_ms'])} ({_ms(row['attributed_min_ms'])} .. {_ms(row['attributed_max_ms'])})"


def _signed(x):
    return ("+" if x >= 0 else "−") + _ms(abs(x))


def _ms(x):
    return "" if x is None else (f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}")


def markdown(device, results, args, meta):
    lines = [f"# What a penalty adds to a training step: {meta['device_name']}", "",
             f"- {meta['date']}, `{meta['command']}`; torch {torch.__version__}, {meta['threads']} torch threads per "
             f"worker, fastreg backends {', '.join(meta['backends'])}",
             f"- {args.rounds} rounds after {args.warmup} warm-up rounds; each contender in its own process; "
             "`zero_grad(set_to_none=True)`, forward, task loss, backward, `optimizer.step()` (SGD lr 1e-3 momentum "
             f"0.9 unless noted); λ = {L2:g} (L1: {L1:g}); AdamW weight_decay {ADAMW_DECAY:g}",
             "- added = median over rounds of (contender's step - the step without a penalty its own process takes "
             "right next to it); spread = interquartile range of those differences (the no-penalty rows show the noise "
             "floor); share = added / baseline step; added CPU = the same for the "
             "worker process's CPU time (all its threads: the work itself, less exposed to other processes); passes "
             "= reads and writes of the parameters' bytes it adds (`bench/step.py` PASSES)",
             f"- in-step ms (profiler) = median over {args.profiled} profiled steps of the time the profiler attributes to "
             "the penalty inside the real step: its calls, the backward of the autograd nodes they created, fastreg's "
             "own ranges (the deferred addition at the end of the backward, an optimizer hook), and the engine's "
             "additions of its gradients into the task's (beyond those of the step without it); in parentheses its "
             "min .. max; resolvable where a difference of two steps is not (`bench/step.py` attribute; profiling "
             "slows each op a little, so it is an upper bound). An optimizer's weight_decay runs inside its own ops: "
             "not attributable"]
    for model, data in results.items():
        lines += ["", f"## {data['title']}", "",
                  "| contender | step ms | in-step ms (profiler) | added ms | spread (IQR) ms | added CPU ms "
                  "| CPU spread (IQR) ms | passes | share of step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data["rows"]:
            if r["error"]:
                lines.append(f"| {r['label']} | skipped: {r['error']} | | | | | | | |")
                continue
            penalized = r["method"] != "none"
            spread = f"{_ms(r['added_q25_ms'])} .. {_ms(r['added_q75_ms'])}"
            added = _ms(r["added_ms"]) + ("" if penalized else " (noise: the same step twice)")
            cpu = _ms(r["added_cpu_ms"])
            cpu_spread = f"{_ms(r['added_cpu_q25_ms'])} .. {_ms(r['added_cpu_q75_ms'])}"
            passes = "" if r.get("passes") is None else str(r["passes"])
            share = f"{100 * r['share']:.1f}%" if penalized and r["share"] is not None else ""
            lines.append(f"| {r['label']} | {_ms(r['step_ms'])} | {_attributed(r)} | {added} | {spread} | {cpu} "
                         f"| {cpu_spread} | {passes} | {share} |")
        for t in data["targets"]:
            ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}"
            lines.append(f"\n- target: {t['target']}: ratio {ratio} ({'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


HEADLINE = [("seed-l2", "seed loop L2"), ("seed-l1", "seed loop L1"), ("autograd", "fastreg `loss + reg()`"),
            ("add-to-grad", "fastreg `add_to_grad_()`"), ("attach", "fastreg `attach(optimizer)`"),
            ("sgd-wd", "SGD `weight_decay`"), ("adamw-wd", "AdamW `weight_decay`")]


def headline(results):
    """The README's opening table: one row per model, each way's time inside the step as the
    profiler attributes it (``attribute``; weight_decay: not attributable), then the wall-clock
    time it adds to a step (median, interquartile range), beside the plain step."""
    lines = ["| model | step without penalty | " + " | ".join(label for _, label in HEADLINE) + " |",
             "|---|---:|" + "---:|" * len(HEADLINE)]
    for data in results.values():
        by = {r["name"]: r for r in data["rows"] if not r["error"]}
        base = by.get("none")
        cells = [data["title"], f"{_ms(base['step_ms'])} ms" if base else "–"]
        for name, _ in HEADLINE:
            r = by.get(name)
            if r is None:
                cells.append("–")
                continue
            own = "" if r.get("attributed_ms") is None else f"**{_ms(r['attributed_ms'])} ms**; "
            cells.append(f"{own}wall {_signed(r['added_ms'])} ({_ms(r['added_q25_ms'])} .. {_ms(r['added_q75_ms'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 5.5), squeeze=False)
    for ax, (model, data) in zip(axes[0], results.items()):
        rows = [r for r in data["rows"] if r["method"] != "none" and not r["error"]]
        ys = range(len(rows))
        values = [r["added_ms"] for r in rows]
        low = [r["added_ms"] - r["added_q25_ms"] for r in rows]
        high = [r["added_q75_ms"] - r["added_ms"] for r in rows]
        colors = ["tab:green" if r["method"] in ("autograd", "one-call", "add-to-grad", "attach") else
                  "tab:gray" if r["method"] == "weight-decay" else "tab:red" for r in rows]
        ax.barh(list(ys), values, xerr=[low, high], color=colors, capsize=2)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("ms added to a training step (median, IQR)")
        ax.set_title(data["title"], fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device, models, results = run(args)
    import fastreg

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "threads": args.threads or torch.get_num_threads(), "backends": fastreg.available_backends(),
            "rounds": args.rounds, "warmup": args.warmup, "quick": args.quick}
    try:
        from bench.report import cpu_model, load_average

        meta["device_name"] = meta["device_name"] if device.type == "cuda" else f"CPU: {cpu_model()}"
        meta["load_average_at_end"] = load_average()
    except Exception:
        pass
    partial = args.quick or args.models or args.contenders
    name = f"step-{device.type}{'-quick' if args.quick else ''}-{datetime.date.today().isoformat()}"
    out = args.out or ((RESULTS / "local" / name) if partial else (RESULTS / name))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(device, results, args, meta)
    (out / "results.md").write_text(table)
    (out / "headline.md").write_text(headline(results))  # pasted into the README's opening
    meta["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if not args.no_plot:
        plot(out / "step.png", results)
    print(table)
    print(f"done in {meta['seconds']} s; wrote {out}", file=sys.stderr)
    failed = [r for data in results.values() for r in data["rows"] if r["error"] and r["optimizer"] == "sgd"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
