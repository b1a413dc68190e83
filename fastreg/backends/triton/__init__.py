"""The Triton backend: multi-tensor CUDA kernels for every fastreg term, a few launches per call.

The contract is in ``fastreg/backends/__init__.py``; where this backend sits among the layers,
in ``ARCHITECTURE.md``. In short: every tensor of a call is cut into programs (CUDA blocks) of
about ``chunk`` elements, each walking its tensor in one of three modes (flat, runs of a group,
rows of groups) chosen from the tensor's own structure (``_geometry.Groups``); a program finds
its tensor, range and pointers in int64 device tables built on the host (a host loop and one
host-to-device copy, cached in the caller's workspace) and its coefficients in its tensor's row
of the call's coefficient tables. The sums are two-stage, per tensor (``(T, 3)``),
deterministic and atomic-free; the coefficients stay on the device, so a step can be captured
in a CUDA graph. No tensor count limit, no host sync, 64-bit offsets.

The modules, in reading order (each docstring holds the design of its part):

``tuning.py``   the tuning constants (``BLOCK``, ``NUM_WARPS``, ``MAX_CHUNK``, ...): every module
                reads them there at call time, so set them there (``backend.tuning.BLOCK = ...``).
``kernels.py``  the ``@triton.jit`` kernels, with the modes (``MODE_FLAT`` / ``MODE_RUNS`` /
                ``MODE_ROWS``, and the metric step's ``MODE_GROUP``), the ops (``OP_GRADS`` /
                ``OP_ADD_GRAD`` / ``OP_PROX``) and the term slots and row widths (mirroring
                ``fastreg.backends._terms``) as named constexprs.
``tables.py``   the device tables a call's kernels read, their cache in the workspace, and who
                owns what they point at ("Ownership", "CUDA-graph capture").
``launch.py``   the launchers: the four contract calls as launches over the tables.
``aot.py``      ``launch_configs()``: every specialization, for the ahead-of-time compile check.
this file       the backend's face: ``NAME``, ``DEVICE_TYPES``, ``VERSIONS_BUMPED``,
                ``unavailable_reason()``, the contract functions (the device checks, then
                ``launch.py``) and ``launch_configs()``.

Only this file imports without triton (the backend is then unavailable). Imports inside the
package are relative, so ``python -m bench.host_overhead --module DIR`` can load another copy
of the package beside this one.
"""

import contextlib
import os

import torch

from fastreg.backends import _terms

from . import tuning  # noqa: F401  (the tuning constants' home: fastreg.backends.triton.tuning)

NAME = "triton"
VERSIONS_BUMPED = False  # kernels write through raw pointers: fastreg._ops bumps
METRIC_PROX = True  # prox_(..., metric=...): the step in a diagonal metric, fused (_metric_prox_kernel)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under TRITON_INTERPRET=1 kernels run on the host and read raw host addresses, so only CPU
# tensors can work (the interpreter copies CUDA tensor arguments to the host, but not the
# memory the device tables point at): the backend then runs on "cpu" only.
_INTERPRET = _interpreting()
DEVICE_TYPES = ("cpu",) if _INTERPRET else ("cuda",)

try:  # the package must import without triton: the backend is then unavailable
    import triton
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    aot = kernels = launch = tables = None
else:
    _IMPORT_ERROR = None
    from . import aot, kernels, launch, tables  # noqa: F401  (tables: what tests and tools inspect)


def _mirror_error():
    """``None`` when the kernels' term slots and row widths agree with
    ``fastreg.backends._terms``, else the disagreement (then the backend is unavailable, with
    this as the reason)."""
    k = kernels
    mirrored = {
        ("Sum", "ABS"): k.SUM_ABS, ("Sum", "SQUARE"): k.SUM_SQUARE, ("Sum", "GROUP_NORM"): k.SUM_GROUP_NORM,
        ("Gradient", "L1"): k.GRADIENT_L1, ("Gradient", "L2"): k.GRADIENT_L2, ("Gradient", "GROUP"): k.GRADIENT_GROUP,
        ("Prox", "THRESHOLD"): k.PROX_THRESHOLD, ("Prox", "DENOMINATOR"): k.PROX_DENOMINATOR,
        ("Prox", "GROUP_THRESHOLD"): k.PROX_GROUP_THRESHOLD, ("Prox", "MIN_NORM"): k.PROX_MIN_NORM,
        ("Prox", "MAX_NORM"): k.PROX_MAX_NORM, ("Prox", "NONNEG"): k.PROX_NONNEG,
        ("MetricSlot", "SCALE"): k.METRIC_SCALE, ("MetricSlot", "EPS"): k.METRIC_EPS,
        ("MetricSlot", "ROOT"): k.METRIC_ROOT, ("MetricSlot", "IDENTITY"): k.METRIC_IDENTITY,
        ("MetricSlot", "CENTERED"): k.METRIC_CENTERED,
    }
    try:
        _terms.check_mirror(NAME, {key: slot.value for key, slot in mirrored.items()})
    except RuntimeError as exc:
        return str(exc)
    # The rows the kernels step over: a table row per tensor, a sums row per tensor.
    widths = {"Sum": (k.SUMS, _terms.SUMS), "Gradient": (k.GRADIENT_SLOTS, _terms.GRADIENT_SLOTS),
              "Prox": (k.PROX_SLOTS, _terms.PROX_SLOTS), "MetricSlot": (k.METRIC_SLOTS, _terms.METRIC_SLOTS)}
    wrong = [f"{name} rows of {ours.value} (expected {theirs})" for name, (ours, theirs) in widths.items()
             if ours.value != theirs]
    if wrong:
        return f"fastreg: the {NAME} backend's term rows disagree with fastreg.backends._terms: " + ", ".join(wrong)
    return None


_MIRROR_ERROR = None if kernels is None else _mirror_error()  # checked once, when the package loads


def unavailable_reason():
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    if _MIRROR_ERROR is not None:
        return _MIRROR_ERROR
    if _INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _device_of(params):
    device = params[0].device
    if device.type not in DEVICE_TYPES:
        hint = " (under TRITON_INTERPRET=1 it runs CPU tensors only)" if _INTERPRET else ""
        raise RuntimeError(f"fastreg: the triton backend runs on {'/'.join(DEVICE_TYPES)} "
                           f"tensors, not {device.type}{hint}")
    if launch is None:
        raise RuntimeError(f"fastreg: the triton backend is unavailable: {unavailable_reason()}")
    return device


def _on(device):
    """Triton launches on the current CUDA device: make it the group's device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------------
# The contract (fastreg/backends/__init__.py)
# --------------------------------------------------------------------------------------

def sums(params, centers, groups, shrink=None, workspace=None):
    device = _device_of(params)
    with _on(device):
        return launch.sums(params, centers, groups, shrink, workspace, _capturing(device))


def grads(params, centers, groups, coeffs, group_scale, workspace=None):
    device = _device_of(params)
    with _on(device):
        return launch.grads(params, centers, groups, coeffs, group_scale, workspace, _capturing(device))


def add_grad_(params, grads_, centers, groups, coeffs, group_norms, workspace=None, want_sums=True):
    device = _device_of(params)
    with _on(device):
        return launch.add_grad_(params, grads_, centers, groups, coeffs, group_norms, workspace,
                                _capturing(device), want_sums)


def prox_(params, centers, groups, coeffs, group_norms, workspace=None, metric=None):
    device = _device_of(params)
    with _on(device):
        launch.prox_(params, centers, groups, coeffs, group_norms, workspace, _capturing(device), metric)


def launch_configs():
    """Every specialization the contract calls can launch, for an ahead-of-time compile: see
    ``aot.launch_configs``; empty without triton."""
    return [] if aot is None else aot.launch_configs()
