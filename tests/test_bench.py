"""The benchmark harnesses run, write their files and report what they claim (quick modes, in
subprocesses, into temporary folders: a quick run never touches the committed results)."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def _run(args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MPLBACKEND="Agg", **(env or {})))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def test_penalty_benchmark_every_term(tmp_path):
    _run(["bench", "--quick", "--cases", "mlp", "--penalty", "all", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in data["results"] if r["median_ms"] is not None]
    assert {r["penalty"] for r in rows} == {"l2", "l1", "group-rows", "group-cols", "l2-center", "l2-2-settings",
                                            "l2-10-settings", "metric-prox-l1", "metric-prox-l2-center"}
    # one Penalty with S param groups, and one Penalty per setting, against the same reference
    assert {r["contender"] for r in rows if r["penalty"] == "l2-10-settings"} >= {
        "hand-loop", "fastreg-cpu", "fastreg-cpu-add-to-grad", "fastreg-cpu-per-setting"}
    for r in rows:
        if r["rel_err"] is not None:
            assert abs(r["rel_err"]) < 1e-6, r
        if r["contender"].startswith("fastreg") and r["grad_err"] is not None:
            assert r["grad_err"] < 1e-6, r
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    assert "group-cols: Σ‖columns‖ + Σw²" in (tmp_path / "results.md").read_text()
    _check_metric_prox(data, (tmp_path / "results.md").read_text())


def _check_metric_prox(data, text):
    """One proximal step in Adam's metric: GB/s over w, v (and c) read and w written, against the
    flat torch.sum over as many bytes and the per-tensor loop, each checked against float64."""
    expected = {"flat-sum", "metric-prox-loop", "metric-prox-foreach", "fastreg-cpu-prox-metric",
                "fastreg-cpu-attach-adam", "fastreg-torch-prox-metric", "fastreg-torch-attach-adam"}
    for penalty, passes in (("metric-prox-l1", 3), ("metric-prox-l2-center", 4)):
        rows = [r for r in data["results"] if r["penalty"] == penalty]
        assert not [r for r in rows if r["skipped"]], penalty
        assert {r["contender"] for r in rows} >= expected, penalty
        for r in rows:
            assert r["mode"] == "prox" and r["passes"] == passes and r["bytes"] == r["numel"] * passes * 4, r
            assert r["gbps"] > 0 and r["of_flat_sum"] > 0, r
            if r["contender"] == "flat-sum":
                continue
            assert r["speedup_vs_seed"] > 0, r  # against the loop
            assert r["prox_err"] < 1e-6, r  # every contender agrees with float64 to float32
    assert "| case | contender | ms | GB/s | of torch.sum | x loop | prox err | notes |" in text
    assert "## metric-prox-l1: one proximal step of Σ|w| in Adam's metric" in text


def test_training_step_benchmark(tmp_path):
    # The --quick form on every quick model (a small LM, a small CNN, the seed MLP), fewer rounds.
    _run(["bench.step", "--quick", "--rounds", "3", "--warmup", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["results"]) == {"lm", "cnn", "mlp"}
    for model, result in data["results"].items():
        rows = result["rows"]
        names = {r["name"] for r in rows}
        assert {"none", "seed-l2", "seed-l1", "foreach-norm", "autograd", "one-call", "add-to-grad", "attach",
                "sgd-wd", "adamw-wd"} <= names, model
        assert all(r["error"] is None for r in rows if r["optimizer"] == "sgd"), rows
        assert all(len(r["times_s"]) == 3 for r in rows if r["error"] is None)
        assert all(r["step_ms"] > 0 for r in rows if r["error"] is None)
    text = (tmp_path / "results.md").read_text()
    assert ("| contender | step ms | in-step ms (profiler) | added ms | spread (IQR) ms | added CPU ms "
            "| CPU spread (IQR) ms | passes ") in text
    for result in data["results"].values():  # the profiler's attribution: each part where it belongs
        by = {r["name"]: r for r in result["rows"]}
        assert by["seed-l2"]["attributed_parts"]["backward_nodes_ms"] > 0  # the loop's own autograd nodes
        assert by["autograd"]["attributed_parts"]["fastreg_ranges_ms"] > 0  # the deferred add_grad_
        assert by["attach"]["attributed_parts"]["fastreg_ranges_ms"] > 0  # its optimizer hook
        assert by["add-to-grad"]["attributed_parts"]["calls_ms"] > 0
        assert by["sgd-wd"].get("attributed_ms") is None and by["none"].get("attributed_ms") is None
    assert "target: fastreg autograd adds <= 1/5" in text and "target: fastreg autograd adds <= 1.2x" in text
    assert all(r["added_cpu_ms"] is not None and len(r["cpu_times_s"]) == 3 for result in data["results"].values()
               for r in result["rows"] if r["error"] is None)
    assert (tmp_path / "step.png").exists()
    headline = (tmp_path / "headline.md").read_text()
    assert headline.startswith("| model | step without penalty | seed loop L2 |") and "seed MLP" in headline


def test_bf16_weights_with_fp32_gradients(tmp_path):
    _run(["bench", "--quick", "--cases", "mlp", "--dtype", "bf16", "--grad-dtype", "fp32",
          "--contenders", "seed-loop,fastreg-*", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["grad_dtype"] == "fp32"
    rows = [r for r in data["results"] if r["median_ms"] is not None and r["mode"] == "fwd+bwd"]
    assert {r["contender"] for r in rows} >= {"seed-loop", "fastreg-cpu-add-to-grad", "fastreg-torch-add-to-grad"}
    for r in rows:  # bf16 w (2 bytes) for 4 of the 6 autograd passes, fp32 p.grad (4 bytes) for 2; add_to_grad_: 1 + 2
        per_element = 4 * 2 + 2 * 4 if r["passes"] == 6 else 2 + 2 * 4
        assert r["bytes"] == r["numel"] * per_element, r
        if r["contender"].startswith("fastreg"):
            assert r["grad_err"] < 1e-6, r  # fp32 gradients: no bf16 rounding of the update


@pytest.fixture
def gpu_check(monkeypatch):
    """bench/gpu_check.py as a module (the repository root is not on sys.path under a bare `pytest`)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.gpu_check")


def _summary_rows(summary):
    """(step, status) of each row of summary.md's step table, in order."""
    rows = [line.split(" | ") for line in summary.splitlines() if re.match(r"\| \d+ \| ", line)]
    return [(cells[1], cells[2]) for cells in rows]


def test_gpu_check_harness_self_test(tmp_path, gpu_check):
    _run(["bench.gpu_check", "--self-test", "--out", str(tmp_path)], timeout=500)
    summary = (tmp_path / "summary.md").read_text()
    rows = _summary_rows(summary)
    assert [step for step, _ in rows] == [s.name for s in gpu_check.STEPS] == [
        "warm-up", "correctness", "cuda-tests", "cuda-tests-no-caching", "memcheck", "copy-bandwidth", "bench-fp32",
        "bench-bf16", "sweep"], summary
    memcheck = "passed" if gpu_check.sanitizer_path() else "skipped: compute-sanitizer not found"
    assert [status for _, status in rows] == ["passed"] * 4 + [memcheck] + ["passed"] * 4, summary
    assert re.search(r"\| warm-up \| passed \|.*\| \d+ kernels compiled", summary), summary
    assert ("pytest-xdist -n 1" if importlib.util.find_spec("xdist") else "serially") in summary
    assert "GB/s and share of the device copy bandwidth (" in summary and "| bf16 / fp32 | seed MLP" in summary
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["ok"] and data["copy_gbps"] > 0 and data["warm_up"]["calls"] > 0
    assert [r["step"] for r in data["steps"]] == [s.name for s in gpu_check.STEPS]
    assert all(r["seconds"] <= r["timeout_s"] + 1 for r in data["steps"] if "timeout_s" in r)
    assert json.loads((tmp_path / "versions.json").read_text())["torch"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["rows"]) == 7 and all("add_to_grad__ms" in r for r in sweep["rows"])


def test_gpu_check_a_failed_or_timed_out_step_leaves_the_summary(tmp_path, gpu_check, monkeypatch):
    # The orchestration alone, with steps that fail, hang, raise: every later step still runs, the
    # summary is on disk before each step (the "reads" steps check it), and time a step leaves
    # unused goes to the next ones.
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1.0)

    def command(name, code, *args):
        return lambda ctx, timeout_s: gpu_check.run_command(ctx, name, [sys.executable, "-c", code, *args], timeout_s)

    def reads(*expected):  # the summary's statuses so far, by prefix
        code = ("import json, sys; steps = json.load(open(sys.argv[1]))['steps']; "
                "sys.exit(not all(s['status'].startswith(e) for s, e in zip(steps, sys.argv[2:], strict=True)))")
        return command("reads", code, tmp_path / "summary.json", *expected)

    def raises(ctx, timeout_s):
        raise RuntimeError("a bug in a step")

    steps = (gpu_check.Step("fails", command("fails", "raise SystemExit(3)"), 0.3),
             gpu_check.Step("reads", reads("failed", "running", "pending", "pending", "pending", "pending"), 0.05),
             gpu_check.Step("hangs", command("hangs", "import time; time.sleep(600)"), 0.1),
             gpu_check.Step("reads-again", reads("failed", "passed", "timed out", "running", "pending", "pending"),
                            0.05),
             gpu_check.Step("raises", raises, 0.05),
             gpu_check.Step("last", command("last", "pass"), 0.45))
    ctx = gpu_check.Context(out=tmp_path, self_test=True, budget_s=10, info={}, cache_dir=tmp_path / "cache")
    records = gpu_check.run_steps(ctx, steps)
    assert [r["status"].split(" after ")[0] for r in records] == [
        "failed (exit 3)", "passed", "timed out", "passed", "failed (RuntimeError: a bug in a step)", "passed"]
    assert [r["ok"] for r in records] == [False, True, False, True, False, True]
    assert records[1]["timeout_s"] > 10 * 0.05 + 2  # its share, and most of what "fails" left
    assert records[2]["seconds"] <= records[2]["timeout_s"] + 0.5  # stopped at its timeout
    assert [step for step, _ in _summary_rows((tmp_path / "summary.md").read_text())] == [s.name for s in steps]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][-1]["status"] == "passed"


def test_gpu_check_selections(tmp_path, gpu_check):
    (tmp_path / "tests" / "backends").mkdir(parents=True)
    (tmp_path / "tests" / "triton_interpret").mkdir()
    (tmp_path / "tests" / "backends" / "test_triton_cuda.py").write_text("def test_launches(): pass\n")
    (tmp_path / "tests" / "test_plans.py").write_text("def test_the_table_invariant_holds(): pass\n")
    (tmp_path / "tests" / "test_other.py").write_text("def test_something(): pass\n")
    (tmp_path / "tests" / "triton_interpret" / "test_x.py").write_text("def test_ownership(): pass\n")
    files, k = gpu_check.device_memory_selection(tmp_path)
    assert files == ["tests/backends/test_triton_cuda.py", "tests/test_plans.py"]
    (tmp_path / "tests" / "test_ownership.py").write_text("def test_a(): pass\n")
    files, _ = gpu_check.device_memory_selection(tmp_path)
    assert files == ["tests/backends/test_triton_cuda.py", "tests/test_ownership.py", "tests/test_plans.py"]
    assert k == "test_triton_cuda or ownership or invariant"

    assert (gpu_check.xdist_workers(False) > 1) == (importlib.util.find_spec("xdist") is not None)
    (tmp_path / "cache" / "a1").mkdir(parents=True)
    (tmp_path / "cache" / "a1" / "_sums_kernel.cubin").write_bytes(b"")
    (tmp_path / "cache" / "b2").mkdir()  # a launcher, say: an entry, not a kernel
    assert gpu_check.count_cache(tmp_path / "cache") == ({"a1", "b2"}, {"a1"})
    assert gpu_check.count_cache(tmp_path / "nothing") == (set(), set())


def test_gpu_check_refuses_to_run_without_a_gpu_unless_self_testing():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", "/nonexistent"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if "no CUDA GPU here" not in proc.stderr:
        pytest.skip("a GPU is present")
    assert proc.returncode == 2
