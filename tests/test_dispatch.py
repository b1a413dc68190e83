"""Backend choice and input checks: the dispatcher is the only place that knows backends."""

import math
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg import _dispatch


def test_available_backends_always_include_torch_and_keep_preference_order():
    available = fastreg.available_backends()
    assert "torch" in available
    assert available == [name for name in _dispatch.BACKENDS if name in available]


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fastreg.penalty([torch.randn(3)], l2=1.0, backend="cuda")


def test_unavailable_backend_is_a_runtime_error_saying_why():
    unavailable = [name for name in _dispatch.BACKENDS if name not in fastreg.available_backends()]
    if not unavailable:
        pytest.skip("every backend is available on this machine (a CUDA GPU with triton)")
    for name in unavailable:
        with pytest.raises(RuntimeError, match=f"the '{name}' backend is not available: .+"):
            fastreg.penalty([torch.randn(3)], l2=1.0, backend=name)


def test_auto_picks_the_preferred_available_backend_for_cpu():
    expected = next(n for n in _dispatch.AUTO_ORDER["cpu"] if n in fastreg.available_backends())
    assert _dispatch.backend_for("auto", torch.device("cpu")).NAME == expected


def test_fastreg_backend_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTREG_BACKEND", "torch")
    assert _dispatch.backend_for("auto", torch.device("cpu")).NAME == "torch"
    assert "-> torch (cpu" in fastreg.Penalty([torch.randn(2)]).explain()
    monkeypatch.setenv("FASTREG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense' \\(from the environment variable FASTREG_BACKEND\\)"):
        fastreg.penalty([torch.randn(2)], l2=1.0)
    assert fastreg.penalty([torch.ones(2)], l2=1.0, backend="torch").item() == pytest.approx(2.0, rel=1e-6)


def test_auto_falls_back_with_one_warning_at_the_users_line(tmp_path):
    # In a fresh process, break the preferred CPU backend and watch auto fall back once.
    code = """
import warnings, torch, fastreg
from fastreg import _dispatch
_dispatch.AUTO_ORDER["cpu"] = ("missing_backend", "torch")
_dispatch.BACKENDS = _dispatch.BACKENDS + ("missing_backend",)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        value = fastreg.penalty([torch.ones(4)], l2=1.0)
assert value.item() == 4.0
messages = [w for w in caught if "missing_backend" in str(w.message)]
assert len(messages) == 1, [str(m.message) for m in messages]
assert "falling back to the 'torch' backend" in str(messages[0].message)
assert messages[0].filename == __file__, messages[0].filename  # the user's line, not fastreg's
print("ok")
"""
    script = tmp_path / "user_script.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("bad", [-1.0, -1e-30, math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("name", ["l1", "l2"])
def test_bad_coefficients_are_value_errors_naming_them(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be finite and non-negative"):
        fastreg.penalty([torch.randn(3)], **{name: bad})
    with pytest.raises(ValueError, match=f"{name} must be finite and non-negative"):
        fastreg.penalty([torch.randn(3)], **{name: torch.tensor(bad)})


def test_coefficient_changed_to_nan_in_place_is_caught_at_the_next_call():
    l2 = torch.tensor(1.0)
    reg = fastreg.Penalty([torch.randn(3)], l2=l2)
    reg()
    l2.fill_(math.nan)
    with pytest.raises(ValueError, match="l2"):
        reg()


@pytest.mark.parametrize("bad, error", [("0.1", TypeError), (True, TypeError), (torch.ones(2), ValueError),
                                        (torch.tensor(1j), TypeError), (None, TypeError)],
                         ids=["str", "bool", "vector", "complex", "None"])
def test_coefficients_of_the_wrong_kind_are_rejected(bad, error):
    with pytest.raises(error, match="l1"):
        fastreg.penalty([torch.randn(3)], l1=bad)


@pytest.mark.parametrize("lr", [0, -0.1, math.nan, math.inf, "0.1"], ids=str)
def test_prox_needs_a_positive_finite_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        fastreg.Penalty([torch.randn(3)], l1=1.0).prox_(lr)


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend"):
        fastreg.penalty([torch.randn(3)], backend=None)


def test_add_to_grad_rejects_sparse_gradients():
    weight = torch.nn.Parameter(torch.randn(5, 3))
    weight.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(TypeError, match="dense gradients"):
        fastreg.Penalty([weight], l2=1.0).add_to_grad_()


def test_other_real_number_types_are_accepted_as_floats():
    import fractions

    import numpy as np

    params = [torch.ones(4)]
    for l2 in (fractions.Fraction(1, 4), np.float32(0.25), np.int64(1) / 4):
        assert fastreg.penalty(params, l2=l2).item() == 1.0


def test_prox_accepts_an_lr_held_as_a_tensor_or_numpy_scalar():
    import numpy as np

    for lr in (torch.tensor(0.5), np.float64(0.5)):
        w = torch.nn.Parameter(torch.tensor([2.0, 0.25]))
        fastreg.Penalty([w], l1=1.0).prox_(lr)
        assert torch.equal(w.detach(), torch.tensor([1.5, 0.0]))
