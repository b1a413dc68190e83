"""torch.compile cost of a *training step* with a weight penalty: the seed loop vs fastreg.

    python -m bench.compile_time [--loop-timeout 120] [--out DIR]


The step is the forward of a training step, ``loss = task_loss + penalty``, compiled with
``torch.compile(fullgraph=True)``, followed by ``loss.backward()`` (which runs the
AOT-compiled backward). The task loss is a small stand-in that touches one parameter, so
that the figures are the penalty's own cost. Penalties, all L2:

* ``none``: the task loss alone (the baseline every penalty adds to);
* ``seed-loop``: the seed article's ``for p in model.parameters(): reg = reg + torch.norm(p)**2``;
* ``fastreg``: ``reg()`` of a ``fastreg.Penalty`` built once, outside the compiled function.

compile time = wall time of the first step (trace + compile + run) minus the median
steady-state step. Each measurement runs in a fresh subprocess with the inductor / AOTAutograd
caches disabled (a cold compile), under a time limit: a run that hits it is reported as
``> limit``. Writes ``results.md`` and ``results.json`` to ``--out`` and prints the table.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cases import CASES_BY_NAME

L2 = 1e-4
STEADY_STEPS = 5
WORKER_FLAG = "--worker"


CASES = {
    "gpt2": ("GPT-2 small shapes", lambda: [shape for _, shape in CASES_BY_NAME["gpt2"].shapes]),
    "many-2000": ("2000 x 1000", lambda: [(1000,)] * 2000),
    "many-4000": ("4000 x 1000", lambda: [(1000,)] * 4000),
}


def _worker(spec):
    """Build the case, compile the step, time it; print one JSON line."""
    import torch
    from torch import nn

    import fastreg

    torch.manual_seed(0)
    shapes = CASES[spec["case"]][1]()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterList(nn.Parameter(torch.empty(s).normal_(0.0, 0.02)) for s in shapes)

    model = Model()
    first = model.params[0]
    x = torch.randn(16)

    def task_loss(x):
        return (first.reshape(-1)[:16] * x).square().mean()

    penalty = spec["penalty"]
    if penalty == "none":
        def step(x):
            return task_loss(x)
    elif penalty == "seed-loop":
        def step(x):
            reg = torch.tensor(0.0)
            for p in model.parameters():
                reg = reg + torch.norm(p) ** 2
            return task_loss(x) + L2 * reg
    elif penalty == "fastreg":
        reg = fastreg.Penalty(model, l2=torch.tensor(L2), backend=spec["fastreg_backend"])

        def step(x):
            return task_loss(x) + reg()
    else:
        raise ValueError(penalty)

    # One eager step first: loads fastreg's kernels and touches the gradient memory, so that
    # the first compiled step differs from a steady one by compilation only.
    step(x).backward()
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(step, backend=spec["compile_backend"], fullgraph=True)

    def run_step():
        model.zero_grad(set_to_none=True)
        loss = compiled(x)
        loss.backward()
        return loss

    start = time.perf_counter()
    loss = run_step()
    first_s = time.perf_counter() - start
    steady = []
    for _ in range(STEADY_STEPS):
        start = time.perf_counter()
        run_step()
        steady.append(time.perf_counter() - start)
    steady_s = statistics.median(steady)
    with torch.no_grad():
        eager = step(x).item()
    ok = math.isclose(loss.item(), eager, rel_tol=1e-4, abs_tol=1e-6)
    print(json.dumps({"first_s": first_s, "steady_s": steady_s, "compile_s": first_s - steady_s,
                      "value": loss.item(), "eager_value": eager, "value_ok": ok}))


def measure(spec, timeout):
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "bench.compile_time", WORKER_FLAG, json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        return {"timed_out": True, "limit_s": timeout, "wall_s": time.perf_counter() - start}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"error": tail or [f"exit {done.returncode}"], "wall_s": time.perf_counter() - start}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop-timeout", type=float, default=120.0,
                        help="time limit (s) of each seed-loop run, compile included (default 120)")
    parser.add_argument("--timeout", type=float, default=300.0, help="time limit (s) of each other run (default 300)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--penalties", default="none,seed-loop,fastreg", help="comma-separated, of: none, seed-loop, fastreg")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--fastreg-backend", default="auto", help="fastreg backend (default auto)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/compile-time"), help="results folder")
    return parser.parse_args(argv)


def _fmt(result):
    if result.get("timed_out"):
        return f"> {result['limit_s']:.0f} s" + (" (not run)" if result.get("skipped") else " (timed out)")
    if "error" in result:
        return "error"
    return f"{result['compile_s']:.1f} s"


def _fmt_steady(result):
    return f"{result['steady_s'] * 1e3:.1f} ms" if "steady_s" in result else "-"


def markdown(rows, meta):
    lines = [
        f"torch.compile(fullgraph=True, backend={meta['compile_backend']!r}) of `loss = task_loss + L2 penalty`, "
        f"then `loss.backward()`; {meta['machine']}, torch {meta['torch']}, fastreg backend {meta['fastreg_backend']}.",
        "compile time = first compiled step minus median steady step (after one eager warm-up step; cold caches, "
        "one fresh process per cell; the loop is killed at --loop-timeout).",
        "",
        "| case | tensors | elements | penalty | compile time | steady step (fwd+bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['title']} | {row['tensors']} | {row['elements']:,} | {row['penalty']} | "
                     f"{_fmt(row['result'])} | {_fmt_steady(row['result'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        _worker(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    import torch

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    penalties = [p.strip() for p in args.penalties.split(",") if p.strip()]
    rows, loop_timed_out_at = [], None
    for case in cases:
        title, make_shapes = CASES[case]
        shapes = make_shapes()
        tensors, elements = len(shapes), sum(math.prod(s) for s in shapes)
        for penalty in penalties:
            if penalty == "seed-loop" and loop_timed_out_at is not None and tensors > loop_timed_out_at:
                result = {"timed_out": True, "limit_s": args.loop_timeout, "skipped": True,
                          "note": f"not run: {loop_timed_out_at} tensors already timed out"}
            else:
                spec = {"case": case, "penalty": penalty, "compile_backend": args.compile_backend,
                        "fastreg_backend": args.fastreg_backend}
                result = measure(spec, args.loop_timeout if penalty == "seed-loop" else args.timeout)
                if penalty == "seed-loop" and result.get("timed_out"):
                    loop_timed_out_at = tensors
            rows.append({"case": case, "title": title, "tensors": tensors, "elements": elements,
                         "penalty": penalty, "result": result})
            print(f"{title:>20} {penalty:>9}: {_fmt(result)}  (steady {_fmt_steady(result)})"
                  + (f"  ERROR {result['error']}" if "error" in result else ""), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "compile_backend": args.compile_backend, "fastreg_backend": args.fastreg_backend,
            "loop_timeout_s": args.loop_timeout, "l2": L2, "steady_steps": STEADY_STEPS}
    table = markdown(rows, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n" + table + f"written to {args.out}/results.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
