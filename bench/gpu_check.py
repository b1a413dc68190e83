"""``python -m bench.gpu_check``: the one prepared run for a machine with a CUDA GPU.

A GPU machine is rare and short-lived, so this run is ordered to learn the most per minute, and
leaves results behind even when it is cut short. Safe to run blind: no prompts; every step but
one is a subprocess (its own process group) with its own timeout inside one overall budget
(``--budget-s``, default 420 s); the time a step leaves unused carries over to the later ones. At
its timeout a step gets SIGINT first (pytest then still writes what it ran), SIGKILL a few seconds
later. ``summary.md`` and ``summary.json`` are rewritten before and after every step, so a run
killed at any point says what passed, what failed and what was running. Exit status: 0 only if
every step passed (or was skipped by design, below); 1 otherwise; 2 without a CUDA GPU (unless
``--self-test``).

The steps, in order (``STEPS``; each one small function below):

1. ``warm-up``: compiles, once, what the later steps need, into one ``TRITON_CACHE_DIR`` that
   every later subprocess reuses (``--triton-cache-dir``; default
   ``$TMPDIR/fastreg-gpu-check-triton-cache``, outside the tree and the results, so a rerun on
   the same machine finds it warm): builds the C++ extension (``python -m fastreg build``; every
   pytest process loads it), and in parallel one process per (dtype, alignment) calls every op of
   the Triton backend through ``fastreg.Penalty(..., backend="triton")`` on small CUDA tensors:
   value, autograd backward, ``add_to_grad_``, ``prox_``; fp32 / fp64 / bf16 / fp16 (16-bit
   weights with gradients of their own dtype and fp32 ones); without and with a center; no
   groups, ``group_dim`` 0 and 1; 16-byte-aligned and unaligned tensors. The summary gives the
   kernels it compiled (new cache entries holding a ``.cubin``) and how long it took.
2. ``correctness``: the contract, terms, ops and API tests, plus the other fast ones that run
   every backend (accumulation, AMP, attach, inputs, sparsity, weight decay, params, dispatch),
   with ``-m "not gpu_compile"`` (ahead-of-time compiles say nothing on a real GPU) and
   ``-k "not cpu"``: the Triton backend on CUDA next to the torch backend; the C++ backend's
   CPU-only cases are CI's. In parallel (``pytest-xdist -n <k>``) when xdist is importable.
3. ``cuda-tests``: ``tests/backends/test_triton_cuda.py`` (launch counts, no host sync,
   CUDA-graph capture, a 2**31+-element tensor), ``tests/test_ownership.py`` if it exists, and
   every test named ``*ownership*`` / ``*invariant*`` (``-k``; not the C++ backend's cases) on
   real device memory.
4. ``cuda-tests-no-caching``: the same with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (every free
   returns memory to the driver, so a use after free faults instead of reading stale data),
   less the CUDA-graph capture tests (capture needs the caching allocator).
5. ``memcheck``: ``compute-sanitizer --tool memcheck`` on six tests of
   ``tests/backends/test_triton_cuda.py`` (every op against a float64 reference, fp32 / bf16,
   aligned / unaligned, groups and centers; ``-x``; no memory caching), only if
   compute-sanitizer is found and at least ``MEMCHECK_MIN_S`` are left for it; at most
   ``MEMCHECK_MAX_S``. Skipped, or timed out, it is recorded and does not fail the run.
6. ``copy-bandwidth``: in this process, the device-to-device copy bandwidth (``copy_`` of a
   1 GiB tensor, CUDA events, bytes read + written): the ceiling the headline is measured against.
7. ``bench-fp32``, 8. ``bench-bf16``: ``python -m bench --penalty l2`` on the GPT-2 and
   ResNet-50 shape cases (and on a one-tensor case of at least 1e9 elements if bench/cases.py
   has one; the summary says when it has none), the seed loop, ``torch._foreach_norm``,
   ``torch.sum`` on one flat tensor, apex (if installed) and every fastreg backend; fp32, then
   bf16 weights with fp32 gradients (``--grad-dtype fp32``). The summary's headline: fastreg's
   forward, autograd forward+backward and ``add_to_grad_`` in ms, GB/s and % of the copy bandwidth.
9. ``sweep``: the Triton backend's ``BLOCK`` / ``NUM_WARPS`` / ``MAX_CHUNK`` (set in
   ``fastreg.backends.triton.tuning``), one at a time around the defaults, on GPT-2 shapes
   (forward and add_to_grad_), last.

It writes one folder, ``bench/results/<gpu>-<date>/`` (``--out`` to change it): ``summary.md``
(one screen: the machine, every step's status, time and findings, the headline, the sweep),
``summary.json`` (the same, and every step's command), ``versions.json`` (GPU, driver, CUDA,
torch, triton, Python, pytest-xdist, compute-sanitizer, fastreg commit, apex), ``<step>.log``
(each step's output), ``<step>.xml`` (pytest's JUnit report), ``warm-up-*.json``,
``bench-fp32/``, ``bench-bf16/`` (``python -m bench``'s tables) and ``sweep.md`` / ``sweep.json``.

``--self-test`` runs the same harness (order, budget carry-over, summary after every step, xdist
detection, sanitizer skip, warm-up count) on this machine's CPU with a tiny stand-in for each step
(the warm-up and sweep under ``TRITON_INTERPRET=1``, which compiles nothing; a few CPU tests;
``python -m bench --quick`` on the seed MLP); it writes only under ``--out``. For CI, in well under
a minute or two.

    python -m bench.gpu_check                 # on the GPU machine
    python -m bench.gpu_check --budget-s 300  # less time
    python -m bench.gpu_check --self-test --out /tmp/x   # the harness itself, on a CPU
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

DEFAULT_BUDGET_S = 420.0
MIN_STEP_S = 5.0  # while the budget lasts, a step gets at least this long
GRACE_S = 10.0  # at most this long between a step's SIGINT and its SIGKILL (inside its timeout)
MEMCHECK_MIN_S, MEMCHECK_MAX_S = 60.0, 150.0
DEFAULT_TRITON_CACHE = Path(tempfile.gettempdir()) / "fastreg-gpu-check-triton-cache"

# The correctness step's files (those that exist), and its self-test stand-in.
CORRECTNESS_FILES = ("tests/backends/test_contract.py", "tests/test_terms.py", "tests/test_ops.py", "tests/test_api.py",
                     "tests/test_accumulation.py", "tests/test_amp.py", "tests/test_attach.py", "tests/test_inputs.py",
                     "tests/test_sparsity.py", "tests/test_weight_decay.py", "tests/test_params.py",
                     "tests/test_dispatch.py")
STAND_IN_TESTS = "tests/test_params.py"
DEVICE_TESTS = "tests/backends/test_triton_cuda.py"
OWNERSHIP_TESTS = "tests/test_ownership.py"
DEVICE_K = "test_triton_cuda or ownership or invariant"  # a module's name matches all its tests
NO_CACHING_K = "not graph and not captur"  # CUDA-graph capture needs the caching allocator
MEMCHECK_K = "float64_reference and (fp32 or bf16)"
BENCH_CASES = ("gpt2", "resnet50")
BENCH_CONTENDERS = "seed-loop,foreach-norm,flat-sum,fastreg-*"
WARM_UP_DTYPES = ("fp32", "fp64", "bf16", "fp16")
SWEEP = {"BLOCK": (1024, 2048, 4096), "NUM_WARPS": (4, 8, 16), "MAX_CHUNK": (16384, 65536, 262144)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<gpu>-<date>)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total time for all steps (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--triton-cache-dir", type=Path,
                        help=f"TRITON_CACHE_DIR shared by every step (default {DEFAULT_TRITON_CACHE}; "
                             "--self-test: <out>/triton-cache)")
    parser.add_argument("--self-test", action="store_true",
                        help="run the harness on this machine's CPU with tiny steps (for CI; not a GPU check)")
    # The subprocesses of the warm-up and sweep steps.
    parser.add_argument("--warm-up-only", metavar="DTYPE", choices=WARM_UP_DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--unaligned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-case", default="gpt2", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Running commands


class Interrupted(Exception):
    """SIGTERM / SIGINT to the harness: the running step is stopped and the summary written."""


@dataclasses.dataclass
class Context:
    """What every step shares."""

    out: Path
    self_test: bool
    budget_s: float
    info: dict
    cache_dir: Path
    started: float = dataclasses.field(default_factory=time.perf_counter)
    results: dict = dataclasses.field(default_factory=dict)  # measured by one step, read by the summary

    @property
    def env(self):
        """The environment of every subprocess: the shared Triton cache."""
        return {"TRITON_CACHE_DIR": str(self.cache_dir)}

    def elapsed(self):
        return time.perf_counter() - self.started


def _signal_group(proc, sig):
    if proc.poll() is None:  # not yet reaped: its process group is still ours
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def run_commands(ctx, jobs, timeout_s):
    """Run ``jobs`` (``(command, extra env, log path)``) at once, each in its own process group,
    output to its log. At ``timeout_s`` minus a grace period the ones still running get SIGINT,
    at ``timeout_s`` SIGKILL. Returns one ``{"returncode", "timed_out"}`` per job."""
    grace = min(GRACE_S, timeout_s / 5)
    start, procs, interrupted = time.perf_counter(), [], set()  # interrupted: indices stopped at the timeout
    try:
        for command, env, log_path in jobs:
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env={**os.environ, **ctx.env, **(env or {})},
                                              start_new_session=True))
        while any(p.poll() is None for p in procs):
            waited = time.perf_counter() - start
            if waited >= timeout_s:
                for p in procs:
                    _signal_group(p, signal.SIGKILL)
                break
            if waited >= timeout_s - grace and not interrupted:
                interrupted = {i for i, p in enumerate(procs) if p.poll() is None}
                for p in procs:
                    _signal_group(p, signal.SIGINT)
            time.sleep(0.05)
    except BaseException:  # the harness itself is stopped: take the step's processes with it
        for p in procs:
            _signal_group(p, signal.SIGKILL)
        raise
    finally:
        for p in procs:
            p.wait()
    return [{"returncode": p.returncode, "timed_out": i in interrupted and p.returncode != 0}
            for i, p in enumerate(procs)]


def run_command(ctx, name, command, timeout_s, env=None):
    """One command as a step: its record (status, seconds, log, command)."""
    start = time.perf_counter()
    log = ctx.out / f"{name}.log"
    (outcome,) = run_commands(ctx, [(command, env, log)], timeout_s)
    record = {"status": command_status(outcome, timeout_s), "seconds": round(time.perf_counter() - start, 1),
              "log": log.name, "command": " ".join(map(str, command))}
    if env:
        record["env"] = env
    return record


def command_status(outcome, timeout_s):
    if outcome["timed_out"]:
        return f"timed out after {timeout_s:.0f} s"
    return "passed" if outcome["returncode"] == 0 else f"failed (exit {outcome['returncode']})"


def skipped(reason):
    return {"status": f"skipped: {reason}", "ok": True}


def pytest_command(ctx, name, args):
    xml = ctx.out / f"{name}.xml"
    xml.unlink(missing_ok=True)
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", f"--junitxml={xml}", *args]


def run_pytest(ctx, name, args, timeout_s, env=None, wrapper=()):
    """pytest as a step; its record carries the JUnit counts and the failed tests' names."""
    record = run_command(ctx, name, [*wrapper, *pytest_command(ctx, name, args)], timeout_s, env)
    if record["status"] == "failed (exit 5)":
        record["status"] = "failed (exit 5: pytest selected no test)"
    counts = test_counts(ctx.out / f"{name}.xml")
    record["tests"] = counts
    if counts:
        record["notes"] = [f"{counts['tests']} tests: {counts['failures'] + counts['errors']} failed, "
                           f"{counts['skipped']} skipped"]
    return record


def xdist_workers(self_test):
    """``-n`` for the correctness step: 0 (serial) when pytest-xdist cannot be imported."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return 1 if self_test else min(8, max(2, (os.cpu_count() or 2) // 2))  # self-test: the path, cheaply


def sanitizer_path():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / "compute-sanitizer", os.X_OK):
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def device_memory_selection(root=ROOT):
    """The files of the cuda-tests steps and their ``-k``: the device tests, tests/test_ownership.py
    if it exists, and every other test file with a test named *ownership* or *invariant*."""
    files = [DEVICE_TESTS] + ([OWNERSHIP_TESTS] if (root / OWNERSHIP_TESTS).exists() else [])
    named = re.compile(r"^\s*def test_\w*(ownership|invariant)", re.IGNORECASE | re.MULTILINE)
    for path in sorted((root / "tests").rglob("test_*.py")):
        relative = path.relative_to(root).as_posix()
        if relative in files or relative.startswith("tests/triton_interpret/"):  # that suite needs the interpreter
            continue
        if named.search(path.read_text(errors="replace")):
            files.append(relative)
    return files, DEVICE_K


def count_cache(cache_dir):
    """``(entries, kernels)`` in a Triton cache: its top-level entries, and those holding a .cubin."""
    if not cache_dir.is_dir():
        return set(), set()
    entries = {p.name for p in cache_dir.iterdir()}
    kernels = {name for name in entries if any((cache_dir / name).glob("*.cubin"))}
    return entries, kernels


# ------------------------------------------------------------------------------------------
# The steps: each takes the context and its timeout and returns its record


def warm_up(ctx, timeout_s):
    """Build the C++ extension and compile the Triton kernels once, in parallel, into the shared cache."""
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    entries_before, kernels_before = count_cache(ctx.cache_dir)
    if ctx.self_test:  # two interpreted stand-ins: both alignments, a 32- and a 16-bit dtype
        workers, env = [("fp32", False), ("bf16", True)], {"TRITON_INTERPRET": "1"}
    else:
        workers, env = [(dtype, unaligned) for dtype in WARM_UP_DTYPES for unaligned in (False, True)], {}
    jobs = [([sys.executable, "-m", "fastreg", "build"], {}, ctx.out / "warm-up-cpu-build.log")]
    for dtype, unaligned in workers:
        label = f"warm-up-{dtype}-{'unaligned' if unaligned else 'aligned'}"
        (ctx.out / f"{label}.json").unlink(missing_ok=True)  # each worker writes its report there
        jobs.append(([sys.executable, "-m", "bench.gpu_check", "--warm-up-only", dtype, "--out", ctx.out]
                     + (["--unaligned"] if unaligned else []) + (["--self-test"] if ctx.self_test else []),
                     env, ctx.out / f"{label}.log"))
    start = time.perf_counter()
    outcomes = run_commands(ctx, jobs, timeout_s)
    seconds = time.perf_counter() - start
    entries_after, kernels_after = count_cache(ctx.cache_dir)
    compiled, new_entries = len(kernels_after - kernels_before), len(entries_after - entries_before)
    calls, errors = 0, []
    for (_, _, log), outcome in zip(jobs[1:], outcomes[1:]):
        try:
            report = json.loads(log.with_suffix(".json").read_text())
            calls += report["calls"]
            errors += [f"{log.stem}: {e}" for e in report["errors"]]
        except (OSError, ValueError, KeyError):
            errors.append(f"{log.stem}: {command_status(outcome, timeout_s)}, no report")
    build = command_status(outcomes[0], timeout_s)
    failed = [f"{log.stem}: {command_status(o, timeout_s)}" for (_, _, log), o in zip(jobs, outcomes)
              if o["returncode"] != 0]
    status = f"failed ({'; '.join(failed)})" if failed else "passed"
    ctx.results["warm_up"] = {"kernels_compiled": compiled, "new_cache_entries": new_entries,
                              "kernels_in_cache": len(kernels_after), "seconds": round(seconds, 1), "calls": calls}
    notes = [f"{compiled} kernels compiled ({new_entries} new cache entries, {len(kernels_after)} kernels in the "
             f"cache) by {len(workers)} processes, {calls} calls, in {seconds:.0f} s; C++ extension: {build}"]
    notes += errors[:5]
    return {"status": status, "seconds": round(seconds, 1), "notes": notes, "errors": errors[:50],
            "log": ", ".join(log.name for _, _, log in jobs), "command": " & ".join(" ".join(map(str, c))
                                                                                   for c, _, _ in jobs)}


def correctness(ctx, timeout_s):
    """The contract, terms, ops and API tests (and the other fast ones) on CUDA."""
    files = [STAND_IN_TESTS] if ctx.self_test else [f for f in CORRECTNESS_FILES if (ROOT / f).exists()]
    args = [*files, "-m", "not gpu_compile", "-k", "not cpu", "--maxfail=50"]
    workers, env = xdist_workers(ctx.self_test), {}
    if workers:
        args += ["-n", str(workers)]
        if "OMP_NUM_THREADS" not in os.environ:  # k workers, not k times every core
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    record = run_pytest(ctx, "correctness", args, timeout_s, env)
    record.setdefault("notes", []).insert(0, f"pytest-xdist -n {workers}" if workers
                                          else "serially (pytest-xdist is not importable)")
    return record


def _device_memory_tests(ctx, name, timeout_s, env=None, deselect=None):
    def narrowed(k):  # the C++ backend's CPU-only cases are CI's
        return f"({k}) and not cpu" + (f" and {deselect}" if deselect else "")

    files, k = device_memory_selection()
    note = f"{' '.join(files)} -k '{narrowed(k)}'"
    if ctx.self_test:
        files, k, note = [STAND_IN_TESTS], "test_params or ownership or invariant", "on a GPU: " + note
    record = run_pytest(ctx, name, [*files, "-k", narrowed(k), "-m", "not gpu_compile"], timeout_s, env)
    record.setdefault("notes", []).append(note)
    return record


def cuda_tests(ctx, timeout_s):
    """The device tests and the ownership / invariant tests on real device memory."""
    return _device_memory_tests(ctx, "cuda-tests", timeout_s)


def cuda_tests_no_caching(ctx, timeout_s):
    """The same without the caching allocator: a use after free faults."""
    return _device_memory_tests(ctx, "cuda-tests-no-caching", timeout_s, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                                NO_CACHING_K)


def memcheck(ctx, timeout_s):
    """compute-sanitizer memcheck on a few device tests, if it is there and there is time."""
    tool = sanitizer_path()
    if tool is None:
        return skipped("compute-sanitizer not found")
    if timeout_s < MEMCHECK_MIN_S:
        return skipped(f"{timeout_s:.0f} s left for it, under {MEMCHECK_MIN_S:.0f} s")
    timeout_s = min(timeout_s, MEMCHECK_MAX_S)
    selection = [STAND_IN_TESTS, "-k", "glob"] if ctx.self_test else [DEVICE_TESTS, "-k", MEMCHECK_K]
    record = run_pytest(ctx, "memcheck", ["-x", *selection], timeout_s, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                        wrapper=[tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20"])
    try:
        found = re.findall(r"ERROR SUMMARY: (\d+) error", (ctx.out / "memcheck.log").read_text(errors="replace"))
    except OSError:
        found = []
    record.setdefault("notes", []).append(f"memcheck: {found[-1]} errors" if found else "no memcheck error summary")
    if record["status"].startswith("timed out"):
        record.update(status=record["status"] + " (inconclusive, not counted as a failure)", ok=True)
    return record


def copy_bandwidth(ctx, timeout_s):
    """Device-to-device copy_ of a large tensor (CUDA events; on a CPU, wall time): bytes read + written."""
    import torch

    cuda = not ctx.self_test and torch.cuda.is_available()
    numel = 2**28 if cuda else 2**22  # 1 GiB of fp32 (self-test: 16 MiB)
    src = torch.ones(numel, dtype=torch.float32, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    times_s = []
    for i in range(25):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        else:
            start = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - start
        if i >= 5:  # the first ones warm up
            times_s.append(seconds)
    gbps = 2 * src.nbytes / statistics.median(times_s) / 1e9
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    ctx.results["copy_gbps"] = gbps
    where = torch.cuda.get_device_name(0) if cuda else "CPU (self-test)"
    return {"status": "passed", "notes": [f"{_number(gbps)} GB/s ({where}; {2 * numel * 4 / 2**30:.2f} GiB moved "
                                          "per copy, median of 20)"], "copy_gbps": gbps}


def headline_cases():
    """GPT-2, ResNet-50 and a one-tensor case of >= 1e9 elements if bench/cases.py has one; a note if not."""
    from bench.cases import CASES

    huge = [c for c in CASES if c.num_tensors == 1 and c.num_elements >= 10**9]
    if huge:
        return [*BENCH_CASES, huge[0].name], None
    single = [c for c in CASES if c.num_tensors == 1]
    largest = max(single, key=lambda c: c.num_elements, default=None)
    return list(BENCH_CASES), ("bench/cases.py has no 1B-element case" + (
        f" (its largest one-tensor case is {largest.name}, {largest.num_elements:,} elements; not run)"
        if largest else ""))


def _bench(ctx, dtype, timeout_s):
    name = f"bench-{dtype}"
    apex = not ctx.self_test and importlib.util.find_spec("amp_C") is not None  # as bench.contenders.apex_available
    contenders = BENCH_CONTENDERS + (",apex-l2norm" if apex else "")
    command = [sys.executable, "-m", "bench", "--dtype", dtype, "--penalty", "l2", "--contenders", contenders,
               "--out", ctx.out / name]
    if dtype == "bf16":  # bf16 weights with fp32 gradients (p.grad_dtype = None): fp32 accumulation
        command += ["--grad-dtype", "fp32"]
    cases, note = headline_cases()
    if ctx.self_test:
        command += ["--quick", "--cases", "mlp", "--device", "cpu"]
        note = f"on a GPU: --cases {','.join(cases)}" + (f"; {note}" if note else "")
    else:
        command += ["--device", "cuda", "--cases", ",".join(cases)]
    record = run_command(ctx, name, command, timeout_s)
    record["notes"] = [note] if note else []
    return record


def bench_fp32(ctx, timeout_s):
    """python -m bench on the headline cases, fp32."""
    return _bench(ctx, "fp32", timeout_s)


def bench_bf16(ctx, timeout_s):
    """python -m bench on the headline cases, bf16 weights with fp32 gradients."""
    return _bench(ctx, "bf16", timeout_s)


def tuning_sweep(ctx, timeout_s):
    """The Triton constants around their defaults (its own process: kernels recompile)."""
    command = [sys.executable, "-m", "bench.gpu_check", "--sweep-only", "--out", ctx.out]
    env = {}
    if ctx.self_test:
        command += ["--sweep-case", "mlp"]
        env["TRITON_INTERPRET"] = "1"
    record = run_command(ctx, "sweep", command, timeout_s, env)
    record["notes"] = sweep_lines(ctx.out)
    return record


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    run: object  # (Context, timeout_s) -> record
    share: float  # of the budget; what a step leaves unused carries over to the later ones


STEPS = (
    Step("warm-up", warm_up, 0.12),
    Step("correctness", correctness, 0.20),
    Step("cuda-tests", cuda_tests, 0.08),
    Step("cuda-tests-no-caching", cuda_tests_no_caching, 0.08),
    Step("memcheck", memcheck, 0.12),
    Step("copy-bandwidth", copy_bandwidth, 0.01),
    Step("bench-fp32", bench_fp32, 0.15),
    Step("bench-bf16", bench_bf16, 0.13),
    Step("sweep", tuning_sweep, 0.11),
)


def run_steps(ctx, steps=STEPS):
    """Every step in order, each with its share of the budget plus what earlier ones left; the
    summary is written before the first and after every one. Returns the records."""
    records = [{"step": s.name, "status": "pending", "ok": False, "seconds": 0} for s in steps]
    write_summary(ctx, records)
    share = 0.0
    for i, step in enumerate(steps):
        share += step.share
        remaining = ctx.budget_s - ctx.elapsed()
        if remaining < MIN_STEP_S:
            records[i].update(status="not run: the budget is spent")
            write_summary(ctx, records)
            continue
        timeout_s = min(remaining, max(ctx.budget_s * share - ctx.elapsed(), MIN_STEP_S))
        records[i].update(status="running", timeout_s=round(timeout_s, 1))
        write_summary(ctx, records)
        print(f"[gpu_check] {step.name}: up to {timeout_s:.0f} s", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            record = step.run(ctx, timeout_s)
        except (Interrupted, KeyboardInterrupt):
            records[i].update(status="interrupted", seconds=round(time.perf_counter() - start, 1))
            for later in records[i + 1:]:
                later["status"] = "not run: interrupted"
            write_summary(ctx, records)
            raise
        except Exception as exc:  # a bug in a step: recorded, the later steps still run
            record = {"status": f"failed ({type(exc).__name__}: {exc})"[:300]}
        record.setdefault("seconds", round(time.perf_counter() - start, 1))
        record.setdefault("ok", record["status"] == "passed")
        records[i].update(record)
        print(f"[gpu_check] {step.name}: {records[i]['status']} in {records[i]['seconds']:.0f} s", file=sys.stderr,
              flush=True)
        write_summary(ctx, records)
    return records


# ------------------------------------------------------------------------------------------
# Subprocesses: the warm-up's calls, the sweep


def warm_up_calls(dtype_name, unaligned, self_test):
    """Every op of the triton backend through the public API, once per kernel specialization the
    later steps use; returns ``(calls, errors)``."""
    import torch

    import fastreg

    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype, device = dtypes[dtype_name], torch.device("cpu" if self_test else "cuda")
    # Groups in every mode: contiguous runs (group_dim 0 of a Linear weight), strided ones (group_dim 1),
    # runs longer than RUN_LONG * BLOCK, a conv weight, one group, a 1-D tensor (no group term).
    shapes = [(256, 64), (64,), (33, 65), (3, 20000), (64, 3, 3, 3), (1, 300), (7,), (4096,)]
    groups = ((0.0, 0), (0.01, 0), (0.01, 1))
    grad_dtypes = [dtype, torch.float32] if dtype in (torch.bfloat16, torch.float16) else [dtype]
    if self_test:  # the interpreter takes ~0.3 s a call: tiny tensors, fewer calls
        shapes, groups, grad_dtypes = [(8, 70), (70,), (5, 3, 3, 3), (1, 50), (7,)], groups[::2], grad_dtypes[-1:]

    def tensor(shape, dtype_):  # unaligned: one element past a 16-byte boundary
        numel = 1
        for n in shape:
            numel *= n
        offset = 1 if unaligned else 0
        return torch.randn(numel + offset, device=device).to(dtype_)[offset:].view(shape)

    calls, errors = 0, []
    for grad_dtype in grad_dtypes:
        for center in (None, "init"):
            for group, group_dim in groups:
                what = f"{dtype_name} grads {str(grad_dtype)[6:]} center={center} group={group} group_dim={group_dim}"
                try:
                    params = [tensor(s, dtype).detach().requires_grad_() for s in shapes]
                    reg = fastreg.Penalty(params, l1=1e-3, l2=1e-2, group=group, group_dim=group_dim, center=center,
                                          backend="triton")
                    for p in params:
                        if grad_dtype != dtype:
                            p.grad_dtype = None  # torch >= 2.10: a gradient of another dtype
                        p.grad = tensor(p.shape, grad_dtype).zero_()
                    reg().backward()  # sums, then grads (autograd)
                    reg.add_to_grad_()
                    reg.prox_(0.1)
                    calls += 4
                except Exception as exc:
                    errors.append(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls, errors


def warm_up_worker(args):
    label = f"warm-up-{args.warm_up_only}-{'unaligned' if args.unaligned else 'aligned'}"
    start = time.perf_counter()
    calls, errors = warm_up_calls(args.warm_up_only, args.unaligned, args.self_test)
    report = {"dtype": args.warm_up_only, "unaligned": args.unaligned, "calls": calls, "errors": errors,
              "seconds": round(time.perf_counter() - start, 1)}
    (args.out / f"{label}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 1 if errors else 0


def sweep(out, case_name):
    import torch

    import fastreg
    from bench.cases import CASES_BY_NAME, make_params
    from bench.timing import FULL_BUDGET, DeviceClock, measure
    from fastreg import _dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuning = _dispatch.backend("triton").tuning  # the constants' one home: every module reads them there
    params = make_params(CASES_BY_NAME[case_name], torch.float32, device, seed=0)
    for p in params:
        p.grad = torch.zeros_like(p)
    clock = DeviceClock(device)
    numel = sum(p.numel() for p in params)
    defaults = {name: getattr(tuning, name) for name in SWEEP}
    rows = []
    configs = [dict(defaults)] + [dict(defaults, **{name: value}) for name, values in SWEEP.items()
                                  for value in values if value != defaults[name]]
    for config in configs:
        for name, value in config.items():
            setattr(tuning, name, value)
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
        setattr(tuning, name, value)
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
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "date": datetime.date.today().isoformat()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    except Exception as exc:
        info["torch_error"] = str(exc)
    for name in ("triton", "apex", "fastreg", "pytest", "pytest-xdist"):
        try:
            import importlib.metadata

            info[name] = importlib.metadata.version(name)
        except Exception:
            info[name] = None
    info["compute_sanitizer"] = sanitizer_path()
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
    return dict(totals, failed=failed[:30])


# (what the headline calls it, the fastreg contender's name suffix, the bench mode)
HEADLINE_KINDS = (("fwd", "", "fwd"), ("fwd+bwd (autograd)", "", "fwd+bwd"),
                  ("add_to_grad_", "-add-to-grad", "fwd+bwd"))


def bench_headline(folder, copy_gbps):
    """Per case: fastreg's fwd, autograd fwd+bwd and add_to_grad_ (the triton backend where it
    ran, else the fastest fastreg backend), and torch.sum on one flat tensor, as dicts."""
    try:
        data = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return []
    rows = [r for r in data["results"] if r["penalty"] == "l2" and r["median_ms"]]
    out = []
    for case in data["cases"]:
        mine = [r for r in rows if r["case"] == case["name"]]
        backends = {r["contender"].removeprefix("fastreg-").removesuffix("-add-to-grad")
                    for r in mine if r["contender"].startswith("fastreg-")}
        for kind, suffix, mode in HEADLINE_KINDS:
            found = [r for r in mine if r["mode"] == mode and r["contender"] in
                     {f"fastreg-{b}{suffix}" for b in backends}]
            triton = [r for r in found if r["contender"] == f"fastreg-triton{suffix}"]
            if triton or found:
                out.append(_headline_row(case, kind, (triton or sorted(found, key=lambda r: r["median_ms"]))[0],
                                         copy_gbps))
        flat = next((r for r in mine if r["contender"] == "flat-sum" and r["mode"] == "fwd"), None)
        if flat:
            out.append(_headline_row(case, "fwd (reference)", flat, copy_gbps))
    return out


def _headline_row(case, kind, r, copy_gbps):
    return {"case": case["title"], "kind": kind, "contender": r["contender"], "ms": r["median_ms"], "gbps": r["gbps"],
            "copy_share": r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None,
            "speedup_vs_seed": r.get("speedup_vs_seed")}


def sweep_lines(out):
    try:
        rows = json.loads((out / "sweep.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []
    done = [r for r in rows if "add_to_grad__ms" in r and "fwd_ms" in r]
    if not done:
        return []
    fastest = min(done, key=lambda r: r["add_to_grad__ms"])
    return ["fastest add_to_grad_ at " + ", ".join(f"{k}={fastest[k]}" for k in SWEEP)
            + f": {fastest['add_to_grad__ms']:.3f} ms vs {done[0]['add_to_grad__ms']:.3f} ms at the defaults"
            + f" ({len(done)} of {len(rows)} configurations ran; sweep.md)"]


def _number(x):
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_summary(ctx, records):
    """summary.md and summary.json from the records so far (called before and after every step)."""
    info, copy_gbps = ctx.info, ctx.results.get("copy_gbps")
    try:
        headline = {dtype: bench_headline(ctx.out / f"bench-{dtype}", copy_gbps) for dtype in ("fp32", "bf16")}
    except Exception as exc:  # a results.json of another shape: the summary must still be written
        headline = {"fp32": [], "bf16": [], "error": f"{type(exc).__name__}: {exc}"}
    ok = all(r.get("ok") for r in records)
    unfinished = any(r["status"] in ("pending", "running") for r in records)
    ok_so_far = all(r.get("ok") for r in records if r["status"] not in ("pending", "running"))
    lines = [f"# fastreg GPU check{' (self-test on CPU)' if ctx.self_test else ''}: {info.get('gpu', 'no GPU')} "
             f"({info.get('date')})", "",
             f"- torch {info.get('torch')} (CUDA {info.get('cuda')}), triton {info.get('triton')}, driver "
             f"{info.get('driver')}, Python {info.get('python')}, pytest-xdist {info.get('pytest-xdist')}, "
             f"apex {info.get('apex') or 'not installed'}, compute-sanitizer {info.get('compute_sanitizer')}",
             f"- fastreg commit {info.get('git_commit')}; {ctx.elapsed():.0f} s of a {ctx.budget_s:.0f} s budget; "
             f"TRITON_CACHE_DIR {ctx.cache_dir}",
             f"- {'so far' if unfinished else 'result'}: "
             f"{'every step passed or was skipped by design' if ok_so_far else 'NOT every step passed'}", "",
             "| # | step | status | seconds | timeout s | findings |", "|---:|---|---|---:|---:|---|"]
    for i, r in enumerate(records, 1):
        lines.append(f"| {i} | {r['step']} | {_cell(r['status'])} | {r.get('seconds', 0):.0f} | "
                     f"{r.get('timeout_s', '')} | {_cell('; '.join(n for n in r.get('notes', []) if n))} |")
    failed = [(r["step"], name) for r in records for name in ((r.get("tests") or {}).get("failed") or [])]
    if failed:
        lines += ["", "Failed tests (see each step's .log / .xml):"] + [f"- {step}: {name}" for step, name in failed]
    if "error" in headline:
        lines += ["", f"The headline could not be read from bench-*/results.json: {headline['error']}"]
    if copy_gbps or headline["fp32"] or headline["bf16"]:
        lines += ["", f"## Headline: L2 penalty, median time; GB/s and share of the device copy bandwidth "
                      f"({f'{_number(copy_gbps)} GB/s' if copy_gbps else 'not measured'})", "",
                  "| weights / grads | case | what | contender | ms | GB/s | % of copy | x seed loop |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for dtype, label in (("fp32", "fp32 / fp32"), ("bf16", "bf16 / fp32")):
            for h in headline[dtype]:
                share = f"{100 * h['copy_share']:.0f}%" if h["copy_share"] else "-"
                speedup = f"{h['speedup_vs_seed']:.1f}" if h["speedup_vs_seed"] else "-"
                lines.append(f"| {label} | {h['case']} | {h['kind']} | {h['contender']} | {h['ms']:.3g} | "
                             f"{_number(h['gbps'])} | {share} | {speedup} |")
        lines += ["", "Full tables: bench-fp32/results.md, bench-bf16/results.md."]
    _write(ctx.out / "summary.md", "\n".join(lines) + "\n")
    summary = {"self_test": ctx.self_test, "budget_s": ctx.budget_s, "elapsed_s": round(ctx.elapsed(), 1),
               "ok": ok, "triton_cache_dir": str(ctx.cache_dir), "info": info, "steps": records,
               "copy_gbps": copy_gbps, "warm_up": ctx.results.get("warm_up"), "headline": headline}
    _write(ctx.out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return "\n".join(lines)


def _write(path, text):
    """Replace ``path`` at once: a run killed while writing leaves the previous version, not half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def default_out(info):
    name = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or "cpu").lower()).strip("-")
    return RESULTS / f"{name}-{info['date']}"


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv=None):
    args = parse_args(argv)
    if args.sweep_only:
        args.out.mkdir(parents=True, exist_ok=True)
        return sweep(args.out, args.sweep_case)
    if args.warm_up_only:
        return warm_up_worker(args)
    info = versions()
    if not args.self_test and not info.get("cuda_available"):
        print("bench.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); "
              "use --self-test to exercise the harness on a CPU", file=sys.stderr)
        return 2
    out = (args.out or default_out(info)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(info, indent=1) + "\n")
    cache_dir = args.triton_cache_dir or (out / "triton-cache" if args.self_test else DEFAULT_TRITON_CACHE)
    ctx = Context(out=out, self_test=args.self_test, budget_s=args.budget_s, info=info, cache_dir=cache_dir.resolve())
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        records = run_steps(ctx)
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"[gpu_check] interrupted ({exc or 'SIGINT'}); wrote {out}/summary.md", file=sys.stderr)
        return 1
    print(write_summary(ctx, records))
    print(f"[gpu_check] wrote {out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
