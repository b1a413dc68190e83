"""The backend registry: the one place that knows which backends exist, and picks one per device.

``"auto"`` picks, per device type, the first available name in ``AUTO_ORDER``
(``FASTREG_BACKEND`` overrides ``"auto"``). When the preferred backend cannot run, ``"auto"``
warns once (at the user's line) and falls back. The grouping of tensors into kernel calls is
``fastreg._plan``'s.
"""

import importlib
import os

from fastreg._warnings import warn

# Preference order; also the order of available_backends().
BACKENDS = ("triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
FALLBACK = "torch"

_modules = {}
_resolved = {}
_warned = set()


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


# Where the engine puts a param's gradient (csrc/deferral.cpp's values): through the graph, into
# p.grad with no one watching, or nowhere (this backward does not need it).
ROUTE_GRAPH, ROUTE_DEFERRED, ROUTE_UNUSED = 0, 1, 2


def gradient_routes(params):
    """Inside a backward, where the engine will put each param's gradient (see
    ``fastreg.backends.cpu.gradient_routes``: the engine's state is visible from C++ only), or
    None where that cannot be known here."""
    try:
        return backend("cpu").gradient_routes(params)
    except ImportError:
        return None


def layout_watch(tensors, shaped):
    """A compiled ``Plan.current`` check of these tensors' dtypes and devices and of ``shaped``'s
    shapes (``fastreg.backends.cpu.layout_watch``: a zero-argument callable, True once one
    changed), or None where the cpu extension is not loaded (it is never built for this)."""
    try:
        return backend("cpu").layout_watch(tensors, shaped)
    except ImportError:
        return None


def accumulators_locked(params):
    """A context holding the engine's accumulation locks of ``params`` (the deferred backward's
    write into ``p.grad``); only used where ``gradient_routes`` answered, so the extension is loaded."""
    return backend("cpu").accumulators_locked(params)


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
