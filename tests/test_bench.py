"""The benchmark harnesses run, write their files and report what they claim (quick modes, in
subprocesses, into temporary folders: a quick run never touches the committed results)."""

import json
import os
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
    assert {r["penalty"] for r in rows} == {"l2", "l1", "group-rows", "group-cols", "l2-center"}
    for r in rows:
        if r["rel_err"] is not None:
            assert abs(r["rel_err"]) < 1e-6, r
        if r["contender"].startswith("fastreg") and r["grad_err"] is not None:
            assert r["grad_err"] < 1e-6, r
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    assert "group-cols: Σ‖columns‖ + Σw²" in (tmp_path / "results.md").read_text()


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
    assert "| contender | step ms | added ms | spread (IQR) ms | share of step |" in text
    assert "target: fastreg autograd adds <= 1/5" in text
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


def test_gpu_check_harness_self_test(tmp_path):
    _run(["bench.gpu_check", "--self-test", "--out", str(tmp_path), "--budget-s", "400"], timeout=500)
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "bench-fp32", "bench-bf16", "sweep"):
        assert f"| {step} | passed |" in summary, summary
    assert json.loads((tmp_path / "versions.json").read_text())["torch"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["rows"]) == 7 and all("add_to_grad__ms" in r for r in sweep["rows"])


def test_gpu_check_refuses_to_run_without_a_gpu_unless_self_testing():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", "/nonexistent"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if "no CUDA GPU here" not in proc.stderr:
        pytest.skip("a GPU is present")
    assert proc.returncode == 2
