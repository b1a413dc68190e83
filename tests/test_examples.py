"""The digits example runs (``--quick``) and proves its claims: same trajectories, exact zeros."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "digits.py"

for _module in ("sklearn", "matplotlib", "tqdm"):  # the "examples" extra
    pytest.importorskip(_module, reason=f"examples/digits.py needs {_module}: pip install -e '.[examples]'")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_outputs_exist(quick_run):
    out, stdout, _ = quick_run
    png = out / "digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 200_000
    md = (out / "results.md").read_text()
    assert "| run | train acc | test acc | Σw² | exact zeros | penalty µs/step |" in md
    assert md.count("\n| ") >= 9  # header + 8 runs
    assert "| run |" in stdout


def test_every_check_passed(quick_run):
    _, _, data = quick_run
    assert data["checks"] and all(c["ok"] for c in data["checks"]), data["checks"]


def test_fastreg_loop_and_weight_decay_trajectories_match(quick_run):
    _, _, data = quick_run
    diffs = {c["check"]: c["max_abs_diff"] for c in data["checks"] if "max_abs_diff" in c}
    tolerance = data["args"]["tolerance"]
    for pair in ("l2_loop == l2_fastreg", "l2_wd == l2_fastreg", "l1_loop == l1_fastreg"):
        assert diffs[pair] <= tolerance, (pair, diffs[pair])
    assert diffs["l2_wd_half != l2_fastreg"] > 10 * tolerance  # the tutorial's λ/2 does not match


def test_prox_has_exact_zeros_and_subgradient_none(quick_run):
    _, _, data = quick_run
    results = data["results"]
    assert results["l1_prox"]["zeros"] > 0
    assert results["l1_prox"]["zero_fraction"] == results["l1_prox"]["sparsity"]["total_fraction"]
    for key in ("l1_loop", "l1_fastreg", "l2_fastreg", "none"):
        assert results[key]["zeros"] == 0, key


def test_every_run_reports_its_numbers(quick_run):
    _, _, data = quick_run
    results = data["results"]
    assert len(results) == 8
    epochs = data["args"]["epochs"]
    for key, r in results.items():
        assert 0.5 < r["test_acc"] <= 1 and 0.5 < r["train_acc"] <= 1, key
        assert r["sum_sq"] > 0
        assert len(r["history"]["test_acc"]) == len(r["history"]["zero_fraction"]) == epochs
        if r["how"] in ("loop", "fastreg", "prox"):
            assert r["penalty_us_median"] > 0, key
    # L2 shrinks the weights; the correct weight decay as much as the penalty, λ/2 less.
    assert results["l2_fastreg"]["sum_sq"] < results["l2_wd_half"]["sum_sq"] < results["none"]["sum_sq"]


def _run_example(name, tmp_path_factory):
    out = tmp_path_factory.mktemp(name)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory):
    return _run_example("digits_pruning", tmp_path_factory)


def test_pruning_removes_zero_neurons_and_keeps_the_predictions(pruning_run):
    out, data = pruning_run
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(c["ok"] for c in data["checks"]), data["checks"]
    group, none = data["results"]["group"], data["results"]["none"]
    assert group["zero_neurons"] > 0 and none["zero_neurons"] == 0
    assert group["pruned_params"] < group["params"] == none["params"] == none["pruned_params"]
    assert group["same_predictions"] and group["pruned_test_acc"] == group["test_acc"]
    assert sum(group["hidden_sizes"]) == group["neurons"] - group["zero_neurons"]
    # Coupled neuron groups (row + bias [+ out column]): zero neurons whose bias is zero too.
    coupled = data["results"]["coupled"]
    assert coupled["zero_neurons"] > 0 and coupled["removed_neurons_with_nonzero_bias"] == 0
    assert group["removed_neurons_with_nonzero_bias"] == group["zero_neurons"]  # rows alone leave the bias
    assert "| run | test acc | zero hidden neurons |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    return _run_example("digits_finetune", tmp_path_factory)


def test_finetune_compares_no_penalty_l2_and_l2_sp(finetune_run):
    out, data = finetune_run
    assert (out / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = {r["method"] for r in data["results"]}
    assert methods == {"none", "l2", "l2-sp", "l2-sp-beta"}
    # The paper's recipe (body and head in two param groups) logs each group's value.
    assert len(next(r for r in data["results"] if r["method"] == "l2-sp-beta")["last_values"]) == 2
    by_method = {r["method"]: r for r in data["results"]}
    # L2-SP keeps the body nearest its pretrained weights; L2 toward 0 moves it furthest.
    assert (by_method["l2-sp"]["distance"]["mean"] < by_method["none"]["distance"]["mean"]
            < by_method["l2"]["distance"]["mean"])
    for r in data["results"]:
        assert 0.2 < r["new_acc"]["mean"] <= 1 and 0.2 < r["old_acc"]["mean"] <= 1
    assert "| fine-tuning |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    return _run_example("digits_adam", tmp_path_factory)


def test_adam_prox_in_its_metric_gives_exact_zeros_where_the_loss_term_does_not(adam_run):
    out, data = adam_run
    assert all(c["ok"] for c in data["checks"]), data["checks"]
    results = data["results"]
    assert results["loss"]["zero_weights"] == 0 < results["metric"]["zero_weights"]
    assert results["group"]["zero_neurons"] > 0
    assert "| run | test acc |" in (out / "results.md").read_text()
