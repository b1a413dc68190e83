"""``python -m bench.gpu_check``: the one prepared run for a machine with a CUDA GPU.

Safe to run blind: no prompts, every step a subprocess with its own timeout inside one overall
budget (default 450 s, under 8 minutes with start-up), and exit status 0 only if every step
passed. It writes one folder, ``bench/results/<gpu>-<date>/`` (``--out`` to change it):

``summary.md``   one screen: the machine, each step's status, the headline numbers, the sweep.
``versions.json`` GPU, driver, CUDA, torch, triton, Python, fastreg commit, apex (if any).
``tests.txt`` / ``tests.xml``  the whole test suite on CUDA (tests/backends/test_triton_cuda.py
                 included: launch counts, no host sync, CUDA-graph capture, a 2**31+-element tensor).
``bench-fp32/``, ``bench-bf16/``  ``python -m bench`` on every case (bf16: weights in bf16, gradients
                 in fp32, as with fp32 gradient accumulation): the seed loops,
                 ``_foreach_norm``, a ``torch.compile``d loop (fp32), apex's
                 ``multi_tensor_l2norm`` when apex is installed, every fastreg backend.
``sweep.md`` / ``sweep.json``  the Triton backend's ``BLOCK`` / ``NUM_WARPS`` / ``MAX_CHUNK``,
                 one at a time around the defaults, on GPT-2 shapes (forward and add_to_grad_).

    python -m bench.gpu_check                 # on the GPU machine
    python -m bench.gpu_check --budget-s 300  # less time
    python -m bench.gpu_check --self-test --out /tmp/x   # the harness itself, on a CPU, in seconds
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# Each step's share of the budget (the rest of the budget carries over to later steps).
SHARES = {"tests": 0.45, "bench-fp32": 0.25, "bench-bf16": 0.15, "sweep": 0.15}
SWEEP = {"BLOCK": (1024, 2048, 4096), "NUM_WARPS": (4, 8, 16), "MAX_CHUNK": (16384, 65536, 262144)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<gpu>-<date>)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="total time for all steps (default 450)")
    parser.add_argument("--self-test", action="store_true",
                        help="run the harness on this machine's CPU with tiny steps (for CI; not a GPU check)")
    parser.add_argument("--sweep-only", action="store_true", help=argparse.SUPPRESS)  # the sweep's subprocess
    parser.add_argument("--sweep-case", default="gpt2", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Steps


def run_step(name, command, timeout_s, log_path, env=None):
    """Run ``command``; its output goes to ``log_path``. Returns a status dict."""
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1),
                                  env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"failed (timed out after {timeout_s:.0f} s)"
    seconds = time.perf_counter() - start
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "log": log_path.name,
            "command": " ".join(map(str, command))}


def tests_command(out, self_test):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
    if self_test:
        return command + ["tests/test_params.py"]
    return command + ["tests", "-x", "--maxfail=20"]


def bench_command(out, dtype, self_test):
    command = [sys.executable, "-m", "bench", "--dtype", dtype, "--out", str(out / f"bench-{dtype}")]
    if dtype == "bf16":  # bf16 weights with fp32 gradients (p.grad_dtype = None): fp32 accumulation
        command += ["--grad-dtype", "fp32"]
    if self_test:
        return command + ["--quick", "--cases", "mlp", "--device", "cpu"]
    command += ["--device", "cuda"]
    if dtype == "fp32":
        command += ["--compile"]
    else:
        command += ["--penalty", "l2"]
    return command


def sweep_command(out, self_test):
    command = [sys.executable, "-m", "bench.gpu_check", "--sweep-only", "--out", str(out)]
    return command + (["--sweep-case", "mlp"] if self_test else [])


# ------------------------------------------------------------------------------------------
# The sweep (runs in its own process: constants are read at call time, kernels recompile)


def sweep(out, case_name):
    import torch

    import fastreg
    from bench.cases import CASES_BY_NAME, make_params
    from bench.timing import FULL_BUDGET, DeviceClock, measure
    from fastreg import _dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = _dispatch.backend("triton")
    params = make_params(CASES_BY_NAME[case_name], torch.float32, device, seed=0)
    for p in params:
        p.grad = torch.zeros_like(p)
    clock = DeviceClock(device)
    numel = sum(p.numel() for p in params)
    defaults = {name: getattr(module, name) for name in SWEEP}
    rows = []
    configs = [dict(defaults)] + [dict(defaults, **{name: value}) for name, values in SWEEP.items()
                                  for value in values if value != defaults[name]]
    for config in configs:
        for name, value in config.items():
            setattr(module, name, value)
        module.cache_clear()
        reg = fastreg.Penalty(params, l2=2.0 ** -10, backend="triton")
        row = dict(config)
        for mode, fn, passes in (("fwd", lambda: reg(), 1), ("add_to_grad_", reg.add_to_grad_, 3)):
            try:
                timing = measure(fn, clock, FULL_BUDGET)
                row[f"{mode}_ms"] = timing.median_ms
                row[f"{mode}_gbps"] = passes * numel * 4 / (timing.median_ms * 1e-3) / 1e9
            except Exception as exc:  # a config that does not compile or run: recorded, not fatal
                row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(f"[sweep] {row}", file=sys.stderr, flush=True)
    for name, value in defaults.items():
        setattr(module, name, value)
    lines = [f"# Triton tuning sweep: {case_name}, fp32, {device}", "",
             "| BLOCK | NUM_WARPS | MAX_CHUNK | fwd ms | fwd GB/s | add_to_grad_ ms | add_to_grad_ GB/s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [str(row[k]) for k in SWEEP]
        for mode in ("fwd", "add_to_grad_"):
            cells += [f"{row[mode + '_ms']:.3f}", f"{row[mode + '_gbps']:.0f}"] if f"{mode}_ms" in row \
                else [row.get(f"{mode}_error", "-"), ""]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps({"case": case_name, "device": str(device), "rows": rows}, indent=1))
    failed = [row for row in rows if any(k.endswith("_error") for k in row)]
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------
# Reporting


def versions():
    info = {"python": platform.python_version(), "platform": platform.platform(), "date": datetime.date.today()
            .isoformat()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    except Exception as exc:
        info["torch_error"] = str(exc)
    for name in ("triton", "apex", "fastreg"):
        try:
            import importlib.metadata

            info[name] = importlib.metadata.version(name)
        except Exception:
            info[name] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def test_counts(xml_path):
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return dict(totals, failed=failed[:20])


def bench_headline(folder):
    """Per case: fastreg's best backend vs the seed loop (fwd+bwd, L2) and fwd GB/s vs torch.sum."""
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return []
    rows = [r for r in data["results"] if r["penalty"] == "l2" and r["median_ms"]]
    lines = []
    for case in data["cases"]:
        mine = [r for r in rows if r["case"] == case["name"]]
        seed = next((r for r in mine if r["is_baseline"] and r["mode"] == "fwd+bwd"), None)
        flat = next((r for r in mine if r["contender"] == "flat-sum"), None)
        best = {}
        for r in mine:
            if r["contender"].startswith("fastreg-") and r["mode"] == "fwd+bwd":
                kind = "add_to_grad_" if r["contender"].endswith("add-to-grad") else "autograd"
                if kind not in best or r["median_ms"] < best[kind]["median_ms"]:
                    best[kind] = r
        fwd = [r for r in mine if r["contender"].startswith("fastreg-") and r["mode"] == "fwd"]
        fwd_best = max(fwd, key=lambda r: r["gbps"] or 0) if fwd else None
        parts = [case["title"]]
        for kind in ("autograd", "add_to_grad_"):
            r = best.get(kind)
            if r and seed:
                parts.append(f"{kind} {r['median_ms']:.3g} ms ({seed['median_ms'] / r['median_ms']:.1f}x seed)")
        if fwd_best and flat and flat["gbps"]:
            parts.append(f"fwd {fwd_best['gbps']:.0f} GB/s = {100 * fwd_best['gbps'] / flat['gbps']:.0f}% of torch.sum")
        lines.append("- " + "; ".join(parts))
    return lines


def write_summary(out, info, steps, started):
    lines = [f"# fastreg GPU check: {info.get('gpu', 'no GPU')} ({info['date']})", "",
             f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, driver "
             f"{info.get('driver')}, Python {info['python']}, apex {info.get('apex') or 'not installed'}",
             f"- fastreg commit {info.get('git_commit')}; {time.perf_counter() - started:.0f} s in all", "",
             "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    counts = test_counts(out / "tests.xml")
    if counts:
        lines += ["", f"Tests: {counts['tests']} run, {counts['failures'] + counts['errors']} failed, "
                      f"{counts['skipped']} skipped."]
        lines += [f"  - FAILED {name}" for name in counts["failed"]]
    for dtype in ("fp32", "bf16"):
        headline = bench_headline(out / f"bench-{dtype}")
        if headline:
            lines += ["", f"Benchmark, {dtype} (full tables in bench-{dtype}/results.md):", *headline]
    if (out / "sweep.json").exists():
        rows = json.loads((out / "sweep.json").read_text())["rows"]
        done = [r for r in rows if "add_to_grad__ms" in r and "fwd_ms" in r]
        if done:
            fastest = min(done, key=lambda r: r["add_to_grad__ms"])
            lines += ["", "Sweep (sweep.md): fastest add_to_grad_ at " + ", ".join(f"{k}={fastest[k]}" for k in SWEEP)
                      + f": {fastest['add_to_grad__ms']:.3f} ms vs {done[0]['add_to_grad__ms']:.3f} ms at the defaults"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def default_out(info):
    name = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or "cpu").lower()).strip("-")
    return RESULTS / f"{name}-{info['date']}"


def main(argv=None):
    args = parse_args(argv)
    if args.sweep_only:
        args.out.mkdir(parents=True, exist_ok=True)
        return sweep(args.out, args.sweep_case)
    started = time.perf_counter()
    info = versions()
    if not args.self_test and not info.get("cuda_available"):
        print("bench.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); "
              "use --self-test to exercise the harness on a CPU", file=sys.stderr)
        return 2
    out = args.out or default_out(info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(info, indent=1) + "\n")
    env = {"TRITON_INTERPRET": "1"} if args.self_test else {}
    plan = [
        ("tests", tests_command(out, args.self_test), {}),
        ("bench-fp32", bench_command(out, "fp32", args.self_test), {}),
        ("bench-bf16", bench_command(out, "bf16", args.self_test), {}),
        ("sweep", sweep_command(out, args.self_test), env),
    ]
    steps, spent_share = [], 0.0
    for name, command, step_env in plan:
        remaining = args.budget_s - (time.perf_counter() - started)
        if remaining < 5:
            steps.append({"step": name, "status": "failed (no time left in the budget)", "seconds": 0})
            continue
        spent_share += SHARES[name]
        # This step's share, plus whatever earlier steps left unused.
        allowance = min(remaining, args.budget_s * spent_share - (time.perf_counter() - started))
        steps.append(run_step(name, command, max(allowance, 5), out / f"{name}.log", step_env))
    summary = write_summary(out, info, steps, started)
    print(summary)
    print(f"[gpu_check] wrote {out}", file=sys.stderr)
    return 0 if all(s["status"] == "passed" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
