"""The one place that knows which backends exist: it checks coefficients and picks backends.

``"auto"`` picks, per device type, the first available name in ``AUTO_ORDER``
(``FASTREG_BACKEND`` overrides ``"auto"``). When the preferred backend cannot run, ``"auto"``
warns once (at the user's line) and falls back. The grouping of tensors into kernel calls is
``fastreg._plan``'s.
"""

import importlib
import math
import numbers
import os
import torch

from fastreg._warnings import warn

# Preference order; also the order of available_backends().
BACKENDS = ("triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
FALLBACK = "torch"

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_modules = {}
_resolved = {}
_warned = set()


def acc_dtype(dtype):
    """The accumulation and result dtype of a group: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


ENVIRONMENT_VARIABLE = "FASTREG_BACKEND"


def backend(name):
    """The backend module called ``name`` (imported on first use)."""
    module = _modules.get(name)
    if module is None:
        module = importlib.import_module(f"fastreg.backends.{name}")
        _modules[name] = module
    return module


def unavailable_reason(name):
    """``None`` if backend ``name`` can run here, else why not."""
    check_backend_name(name)
    try:
        return backend(name).unavailable_reason()
    except Exception as exc:  # a backend that cannot even import is unavailable, not fatal
        return f"{type(exc).__name__}: {exc}"


def available_backends():
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def check_backend_name(name, source="backend"):
    if name == "auto" or name in BACKENDS:
        return name
    raise ValueError(
        f"fastreg: unknown backend {name!r} (from {source}); choose 'auto' or one of {', '.join(BACKENDS)}"
    )


def environment_backend():
    """``FASTREG_BACKEND`` as set (stripped), or ``""``."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "").strip()


def requested_backend(name):
    """Validate a user's backend argument (``"auto"`` is resolved later, per device)."""
    if not isinstance(name, str):
        raise TypeError(f"fastreg: backend must be a string, got {type(name).__name__}")
    return check_backend_name(name)


def backend_for(requested, device):
    """The backend module that runs tensors on ``device`` when ``requested`` was asked for.

    Called inside the ops, at run time: torch.compile never traces this, and the
    ``FASTREG_BACKEND`` default is read when the kernels run.
    """
    if requested == "auto":
        requested = environment_backend() or "auto"
        if requested != "auto":
            check_backend_name(requested, source=f"the environment variable {ENVIRONMENT_VARIABLE}")
    key = (requested, device.type)
    name = _resolved.get(key)
    if name is None:
        name = _resolve_uncached(requested, device.type)
        _resolved[key] = name
    return backend(name)


def _resolve_uncached(requested, device_type):
    if requested != "auto":
        reason = unavailable_reason(requested)
        if reason is not None:
            raise RuntimeError(f"fastreg: the {requested!r} backend is not available: {reason}")
        device_types = backend(requested).DEVICE_TYPES
        if device_types is not None and device_type not in device_types:
            raise RuntimeError(
                f"fastreg: the {requested!r} backend runs on {'/'.join(device_types)} tensors, "
                f"not {device_type}"
            )
        return requested
    for name in AUTO_ORDER.get(device_type, (FALLBACK,)):
        reason = unavailable_reason(name)
        if reason is None:
            return name
        if name not in _warned:
            _warned.add(name)
            warn(f"fastreg: the {name!r} backend is not available ({reason}); "
                 f"falling back to the {FALLBACK!r} backend")
    return FALLBACK


def check_coefficient(name, value):
    """A penalty coefficient must be a finite, non-negative real number or 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"fastreg: {name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"fastreg: {name} must be real, got a {value.dtype} tensor")
        # Reading a CUDA value would synchronise, and under torch.compile it would break the
        # graph: such coefficients are checked by the user's own schedule, not here.
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return value
        number = value.item()
    elif isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool):
        number = value
    else:
        raise TypeError(f"fastreg: {name} must be a real number or a 0-dim tensor, got {type(value).__name__}")
    # Comparisons only (NaN fails `>= 0`): torch.compile can guard on them when a changing
    # float has become a symbol, where math.isnan() would break the graph.
    if not number >= 0 or number == math.inf:
        raise ValueError(f"fastreg: {name} must be finite and non-negative, got {number}")
    if isinstance(value, numbers.Real) and not isinstance(value, (float, int)):
        return float(value)  # Fraction, numpy scalars, ...: plain floats for the kernels
    return value


def is_zero(coefficient):
    """True for a Python zero: its term can be dropped at trace time."""
    return not isinstance(coefficient, torch.Tensor) and coefficient == 0


def coefficient_vector(values, dtype, device):
    """``values`` (floats or 0-dim tensors) as one tensor for the kernels.

    Float tuples are cached per (values, dtype, device): a training loop with fixed
    coefficients then copies nothing to the GPU after its first step.
    """
    if any(isinstance(c, torch.Tensor) for c in values):
        return torch.stack([torch.as_tensor(c, dtype=dtype, device=device) for c in values]).detach()
    key = (*(float(c) for c in values), dtype, device)
    coeffs = _coefficient_cache.get(key)
    if coeffs is None:
        if len(_coefficient_cache) >= 64:  # a schedule of floats: keep the cache bounded
            _coefficient_cache.clear()
        coeffs = torch.tensor(key[:-2], dtype=dtype, device=device)
        _coefficient_cache[key] = coeffs
    return coeffs


_coefficient_cache = {}
