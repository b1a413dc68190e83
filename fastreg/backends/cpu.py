"""The C++ CPU backend: fused multi-tensor kernels, JIT-built with ninja on first use.

The kernels live in ``csrc/``: one ``.cpp`` per op (``sums``, ``grads``, ``add_grad``, ``prox``),
``library.cpp`` registering them with ``TORCH_LIBRARY(fastreg_cpu, ...)``, and headers split by
concern (``fastreg_cpu.h`` lists them: ``vec.h`` the ISA layer, ``traits.h`` per-dtype loading and
accumulation, ``span.h`` the vectorized loops, ``terms.h`` the term slots and maths,
``schedule.h`` the chunk schedule, ``prepare.h`` tensor preparation, ``passes.h`` the passes).
Fake (meta) implementations are registered here. One call handles every tensor of a
(device, dtype) group: the tensors are laid end to end and cut into ``CHUNK_ELEMS``-element
chunks that ``at::parallel_for`` runs, each into its own partials (one per tensor it touches),
added per tensor in a fixed order (bitwise the same for any thread count). Every tensor has its
own structure (``group_dims`` / ``group_sizes``) and its own row of each coefficient table. fp64
accumulates in fp64; fp32/fp16/bf16 in float over blocks of 8 values per vector lane, then in
double (worst case 11 float roundings: <= 6.6e-7 relative). The inner loops use ATen's
``Vectorized<T>`` at the ISA the build targets.

Mirrors, checked at load
    The slots of the sums and coefficient tables are named in ``backends/_terms.py``; the C++
    kernels' copy (``csrc/terms.h``), reported by ``fastreg_cpu::term_layout()``, must agree
    with it, else the backend is unavailable with the disagreement as its reason. The schedule's
    constants come from ``fastreg_cpu::constants()`` (``constants()``, ``CHUNK_ELEMS``): no
    number is copied from the C++ by hand.

Build
    Built once per machine by ``fastreg/backends/_build.py`` (naming by ISA and source hash,
    the cache, the build lock, the environment knobs: see there) and loaded with
    ``torch.ops.load_library``.

Failure: any problem (no compiler, compile error, load error) becomes the reason returned by
``unavailable_reason()``, computed once and cached, with the compiler's own message in it.
"""

import logging
import threading
import time

import torch

from fastreg.backends import _build, _terms
from fastreg.backends._workspace import may_hold_tensors
from fastreg.backends._build import BuildError, compiler, cpu_isa  # noqa: F401  (part of this module's API)
from fastreg.backends._geometry import acc_dtype as _acc_dtype
from fastreg.backends._geometry import as_groups, group_count

NAME = "cpu"
DEVICE_TYPES = ("cpu",)
VERSIONS_BUMPED = False  # the C++ kernels write through raw pointers: fastreg._ops bumps
METRIC_PROX = True  # prox_(..., metric=...): csrc/metric_prox.cpp

# One translation unit per op (ninja compiles them in parallel) and the shared headers: every
# file in csrc/, since all of them enter the hash that names the build.
SOURCE_FILES = ("library.cpp", "sums.cpp", "grads.cpp", "add_grad.cpp", "prox.cpp", "metric_prox.cpp", "deferral.cpp",
                "value_node.cpp", "add_to_grad.cpp",
                "operands.cpp")
HEADER_FILES = ("fastreg_cpu.h", "vec.h", "traits.h", "span.h", "terms.h", "schedule.h", "prepare.h", "passes.h")
EXTENSION = _build.Extension("fastreg_cpu", SOURCE_FILES, HEADER_FILES, what="the C++ CPU kernels")
# CHUNK_ELEMS (elements per flat chunk, kChunk in csrc/schedule.h) is read from the extension:
# see constants() and __getattr__ below.

log = logging.getLogger("fastreg")

_lock = threading.Lock()
_state = {"tried": False, "reason": None, "library": None, "seconds": None, "built": False}
_ops = None  # namespace of OpOverloads once loaded
_constants = None  # {name: int} from fastreg_cpu::constants(), once loaded


# ------------------------------------------------------------------------------------------
# The backend contract.


def unavailable_reason():
    """``None`` once the extension is loaded; else why not (computed once, never raises)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _load()
                except Exception as exc:  # any failure means "unavailable", never a crash
                    _state["reason"] = exc.args[0] if isinstance(exc, BuildError) else _build.describe(exc)
                    log.debug("fastreg cpu backend unavailable: %s", _state["reason"])
                finally:
                    _state["tried"] = True
    return _state["reason"]


def sums(params, centers, groups, shrink=None, workspace=None):
    params = _as_list(params)
    dims, sizes = _structure(params, groups)
    return _kernels().sums(params, _as_list(centers), dims, sizes, _shrink_table(shrink, params))


def grads(params, centers, groups, coeffs, group_scale, workspace=None):
    params = _as_list(params)
    dims, sizes = _structure(params, groups)
    return _kernels().grads(params, _as_list(centers), dims, sizes, _table(coeffs, params, _terms.Gradient),
                            group_scale)


def add_grad_(params, grads_, centers, groups, coeffs, group_norms, workspace=None, want_sums=True):
    params = _as_list(params)
    dims, sizes = _structure(params, groups)
    result = _kernels().add_grad_(params, _as_list(grads_), _as_list(centers), dims, sizes,
                                  _table(coeffs, params, _terms.Gradient), group_norms, want_sums)
    return result if want_sums else None


def prox_(params, centers, groups, coeffs, group_norms, workspace=None, metric=None):
    params = _as_list(params)
    dims, sizes = _structure(params, groups)
    if metric is None:
        _kernels().prox_(params, _as_list(centers), dims, sizes, _table(coeffs, params, _terms.Prox), group_norms)
    else:
        # float64 coefficients: the step reads 2·lr·l2 as DENOMINATOR − 1
        table = _terms.as_table(coeffs, len(params), _terms.Prox).to(torch.float64).contiguous()
        _kernels().metric_prox_(params, _as_list(centers), list(metric.v), list(metric.centered), dims, sizes, table,
                                metric.table)


# ------------------------------------------------------------------------------------------
# The eager value's node (fastreg._ops._EagerValue), in one call each way: optional backend entries.


def value(params, centers, groups, table, dtype):
    """``(Σ table·sums as dtype, group_sq)`` of one kernel group (``_ops.weighted_total``'s ops in
    C++, after the sums): the eager forward in one call."""
    return _kernels().value(params, _as_list(centers), groups.dims, groups.sizes, table, dtype)


def penalty_value(params, centers, groups, table, dtype, workspace=None):
    """``value``'s total as one op with its own C++ autograd node (``csrc/value_node.cpp``): the
    backward of ``fastreg._ops._EagerValue`` (deferred, through the graph, or under create_graph
    ``fastreg::value_graph_backward``) without Python in the forward or the backward. With a
    ``workspace``, on the operands bound there (``_operands``)."""
    kernels = _kernels()
    bound = _operands(params, centers, groups, workspace)
    if bound is not None:
        return kernels.penalty_value_of(bound.handle, table, dtype)
    return kernels.penalty_value(params, _as_list(centers), groups.dims, groups.sizes, table, dtype)


def add_to_grad(params, centers, groups, table, workspace=None):
    """``Penalty.add_to_grad_`` of one kernel group in one call (``csrc/add_to_grad.cpp``): each
    ``p.grad`` created where None, the gradient added, the versions bumped; the value
    (``_ops.weighted_total`` of the sums, in the acc dtype), or None, having written nothing,
    where the gradients need the Python path (one it refuses, or several gradient dtypes). With
    a ``workspace``, on the operands bound there (``_operands``)."""
    kernels = _kernels()
    bound = _operands(params, centers, groups, workspace)
    if bound is not None:
        return kernels.add_to_grad_of(bound.handle, table)
    return kernels.add_to_grad(params, _as_list(centers), groups.dims, groups.sizes, table)


def _operands(params, centers, groups, workspace):
    """The ``_Held`` handle of ``(params, centers, groups)`` bound in C++ (``csrc/operands.cpp``),
    made once and kept in the kernel group's ``workspace``, or None (no workspace, or
    ``may_hold_tensors`` says no): a call then hands over one integer, where lists of tensors
    cost torch.ops about 0.1 µs a tensor to convert. The caller keeps the returned object alive
    over its op call (another thread may replace the workspace's entry meanwhile). Found again by
    the identity of the very lists and ``groups`` the plan passes at every call (the entry holds
    them, so an id is never reused while it lives; the workspace contract: a list passed with a
    workspace is never modified, see ``backends/__init__.py``); the C++ entry holds the params
    and centers, as the plan does, and is released when the workspace drops the entry (the
    ``Penalty`` gone, a regroup, or ``may_hold_tensors`` turned off)."""
    if workspace is None:
        return None
    key = ("operands", id(params), id(centers), id(groups))
    if not may_hold_tensors():
        workspace.drop(key)
        return None
    bound = workspace.get(key, lambda b: b.params is params and b.centers is centers and b.groups is groups)
    if bound is None:
        bound = _Held(_ops.bind_operands(params, _as_list(centers), list(groups.dims), list(groups.sizes)),
                      _ops.release_operands, params=params, centers=centers, groups=groups)
        workspace.put(key, bound)
    return bound


def layout_watch(tensors, shaped):
    """A zero-argument check that any of ``tensors`` changed dtype or device, or any of
    ``shaped`` changed shape, since now (``fastreg._plan.Plan.current``'s check in one C++ call:
    ``csrc/operands.cpp``, about 1 µs however many tensors); None while the extension is not
    loaded (never loads it) or ``may_hold_tensors()`` says no. The C++ entry is released when
    the returned object dies."""
    if _ops is None or not may_hold_tensors():
        return None
    return _Held(_ops.watch_layout(list(tensors), list(shaped)), _ops.release_layout, call=_ops.layout_changed)


def memory_watch(tensors):
    """A zero-argument check that any of ``tensors`` moved (data pointer), or changed shape or
    strides, since now: the Triton backend's cache-hit check in one C++ call
    (``csrc/operands.cpp``, about 1 µs plus 5 ns a tensor); None where the extension is not built
    (never built for this: the caller then compares in Python). The C++ entry holds the tensors,
    as the caller's table does, and is released when the returned object dies."""
    if not may_hold_tensors() or not _loaded_if_built():
        return None
    return _Held(_ops.watch_memory(list(tensors)), _ops.release_memory, call=_ops.memory_changed)


def targets_watch(tensors):
    """``memory_watch`` of a call's write targets (gradients) through weak references: none is
    kept alive, and one that is gone counts as changed. None where the extension is not built."""
    if not may_hold_tensors() or not _loaded_if_built():
        return None
    return _Held(_ops.watch_targets(list(tensors)), _ops.release_targets, call=_ops.targets_changed)


class _Held:
    """An entry of a C++ registry (``csrc/operands.cpp``) by its handle, released when this dies,
    with what the entry was made from (kept for identity checks) and, for a watch, the op that
    reads it (``watch()``)."""

    __slots__ = ("handle", "_release", "_call", "params", "centers", "groups")

    def __init__(self, handle, release, call=None, params=None, centers=None, groups=None):
        self.handle, self._release, self._call = handle, release, call
        self.params, self.centers, self.groups = params, centers, groups

    def __call__(self):
        return self._call(self.handle)

    def __deepcopy__(self, memo):
        return None  # a copy owns no C++ entry: its owner makes its own (Plan.current; a Workspace's copy is empty)

    def __del__(self):
        try:
            self._release(self.handle)
        except Exception:  # (interpreter shutdown: the library may be gone already)
            pass


def handles_held():
    """``[operands bound, layouts watched, memories watched, targets watched]`` in the C++
    registries now (ownership tests)."""
    return list(_kernels().handles_held())


def defer_add_grad(params, centers, groups, table, grad_value, group_sq):
    """Inside the value's backward: queues ``p.grad += the penalty's gradient`` at the end of the
    backward where no one can tell (``csrc/deferral.cpp``; the conditions of ``_ops``' deferred
    backward, the addition and its locks in C++); the number of params queued, or -1 where the
    gradient must go through the graph."""
    return _kernels().defer_add_grad(params, _as_list(centers), groups.dims, groups.sizes, table, grad_value,
                                     group_sq)


def deferral_log():
    """``[additions run so far, params of each of the last ones...]`` (tests count them)."""
    return list(_kernels().deferral_log())


# ------------------------------------------------------------------------------------------
# Not a kernel: what the autograd engine will do with each param's gradient (csrc/deferral.cpp),
# for fastreg._ops' deferred backward. The engine's state is only visible from C++.

def gradient_routes(params):
    """Inside a backward, per param (``fastreg._dispatch.ROUTE_*``): 1 (the engine accumulates its
    gradient into ``p.grad`` with no hook watching), 2 (this backward does not need it) or 0 (it
    must go through the graph); ``None`` when the extension is not loaded. Never builds inside a backward:
    the extension is loaded here only when it is already built (the cpu backend builds it on first
    use; ``python -m fastreg build`` on a GPU machine), checked once per process."""
    if not _loaded_if_built():
        return None
    return _ops.gradient_routes(params)


def _loaded_if_built():
    """Whether the extension is loaded, loading it first where it is already built (checked once
    per process); never builds it."""
    if not _state["tried"]:
        if "cached_build" not in _state:
            _state["cached_build"] = EXTENSION.is_built()
        if not _state["cached_build"]:
            return False
    return unavailable_reason() is None


class accumulators_locked:
    """``with accumulators_locked(params):`` holds the locks the autograd engine's AccumulateGrad
    takes while it writes these params' ``.grad`` (the deferred backward writes them outside the
    engine; a concurrent backward on the same params waits). Needs the extension loaded, as
    ``gradient_routes`` does."""

    def __init__(self, params):
        self.params = params

    def __enter__(self):
        self.token = _kernels().lock_accumulators(self.params)

    def __exit__(self, *exc):
        _kernels().unlock_accumulators(self.token)


def _structure(params, groups):
    """Every param's ``(group_dims, group_sizes)`` entries, as the ops take them (``groups``: a
    ``_geometry.Groups`` or one group_dim for every param)."""
    groups = as_groups(params, groups)
    return list(groups.dims), list(groups.sizes)


def _table(coeffs, params, kind):
    """``coeffs`` (a table, or a vector for every param) as the contiguous ``(T, len(kind))``
    acc-dtype table the ops read."""
    return _terms.as_table(coeffs, len(params), kind).to(_acc_dtype(params[0].dtype)).contiguous()


def _shrink_table(shrink, params):
    """``sums``' shrink: ``None`` (s = d), or a Prox table (per param THRESHOLD and NONNEG) from a
    table or a float threshold for every param."""
    if shrink is None or (not isinstance(shrink, torch.Tensor) and shrink == 0):
        return None
    if not isinstance(shrink, torch.Tensor):
        shrink = torch.tensor([float(shrink)], dtype=_acc_dtype(params[0].dtype))
    return _table(shrink.detach(), params, _terms.Prox)


def constants():
    """The schedule's constants as the loaded extension reports them (``fastreg_cpu::constants()``):
    ``chunk_elems`` (elements per flat chunk), ``run_min``, ``row_max``, ``rows_task`` (see
    ``csrc/schedule.h``). Loads the extension; raises if the backend is unavailable."""
    _kernels()
    return dict(_constants)


def __getattr__(name):
    # CHUNK_ELEMS: filled from the extension on first use (importing this module builds nothing).
    if name == "CHUNK_ELEMS":
        return constants()["chunk_elems"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def term_mirror():
    """The C++ kernels' term slots, ``{(enum, name): value}`` from ``fastreg_cpu::term_layout()``,
    in the form ``_terms.check_mirror`` compares."""
    return {tuple(key.split(".", 1)): value for key, value in _named_ints(torch.ops.fastreg_cpu.term_layout()).items()}


def _named_ints(text):
    """``"a=1,b=2"`` (what the extension's constant ops return) -> ``{"a": 1, "b": 2}``."""
    return {key: int(value) for key, value in (item.split("=", 1) for item in text.split(","))}


def _as_list(tensors):
    if tensors is None:
        return []
    return tensors if isinstance(tensors, list) else list(tensors)


def _kernels():
    if _ops is None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastreg: the 'cpu' backend is not available: {reason}")
    return _ops


# ------------------------------------------------------------------------------------------
# The build (the machinery is in _build.py).


def source_dir():
    return EXTENSION.source_dir()


def build_config():
    """Everything that names and locates the build, without building anything."""
    return EXTENSION.config()


def build_info():
    """A dict describing the build, for ``python -m fastreg info`` (builds nothing)."""
    info = EXTENSION.info()
    info["loaded"] = _ops is not None
    if _state["tried"]:
        info["reason"] = _state["reason"]
        info["load_seconds"] = _state["seconds"]
        info["built_now"] = _state["built"]
    return info


def build(force=False):
    """Build (or load the cached build) now; returns ``build_info()``. Raises on failure.

    ``force`` deletes the cached build first; it must run before the library is loaded in
    this process (the CLI's ``build --force`` does).
    """
    if force:
        if _ops is not None:
            raise RuntimeError("fastreg: the cpu extension is already loaded in this process; "
                               "rebuild from a fresh one")
        EXTENSION.remove_cached()
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastreg: the 'cpu' backend is not available: {reason}")
    return build_info()


def _load():
    global _ops, _constants
    start = time.perf_counter()
    config, built = EXTENSION.load()
    try:  # a binary whose term slots disagree with _terms.py would silently mix up the terms
        _terms.check_mirror("cpu", term_mirror())
    except RuntimeError as exc:
        raise BuildError(f"{exc.args[0]} (csrc/terms.h and fastreg/backends/_terms.py must name the same "
                         f"slots; loaded {config['library']})") from exc
    _constants = _named_ints(torch.ops.fastreg_cpu.constants())
    _register_fakes()
    _ops = _Ops()
    _state.update(library=config["library"], seconds=time.perf_counter() - start, built=built)


# ------------------------------------------------------------------------------------------
# Fake (meta) implementations, so torch.compile / opcheck can trace the C++ ops.

_fakes_registered = False


def _register_fakes():
    global _fakes_registered
    if _fakes_registered:
        return

    def sums_like(params, group_dims, group_sizes):
        acc = _acc_dtype(params[0].dtype)
        entries = sum(group_count(p, d, k) for p, d, k in zip(params, group_dims, group_sizes))
        return (params[0].new_empty((len(params), _terms.SUMS), dtype=acc), params[0].new_empty((entries,), dtype=acc))

    @torch.library.register_fake("fastreg_cpu::sums")
    def _sums_fake(params, centers, group_dims, group_sizes, shrink):
        return sums_like(params, group_dims, group_sizes)

    @torch.library.register_fake("fastreg_cpu::value")
    def _value_fake(params, centers, group_dims, group_sizes, table, dtype):
        return params[0].new_empty((), dtype=dtype), sums_like(params, group_dims, group_sizes)[1]

    @torch.library.register_fake("fastreg_cpu::penalty_value")
    def _penalty_value_fake(params, centers, group_dims, group_sizes, table, dtype):
        return params[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("fastreg_cpu::grads")
    def _grads_fake(params, centers, group_dims, group_sizes, coeffs, group_scale):
        return [torch.empty_like(p) for p in params]

    @torch.library.register_fake("fastreg_cpu::add_grad_")
    def _add_grad_fake(params, grads_, centers, group_dims, group_sizes, coeffs, group_norms, want_sums=True):
        return sums_like(params, group_dims, group_sizes)

    @torch.library.register_fake("fastreg_cpu::prox_")
    def _prox_fake(params, centers, group_dims, group_sizes, coeffs, group_norms):
        return None

    @torch.library.register_fake("fastreg_cpu::metric_prox_")
    def _metric_prox_fake(params, centers, metric, centered, group_dims, group_sizes, coeffs, metric_table):
        return None

    _fakes_registered = True


class _Ops:
    """The loaded ops as OpOverloads (looked up once: cheaper per call than torch.ops.x.y)."""

    def __init__(self):
        namespace = torch.ops.fastreg_cpu
        self.sums = namespace.sums.default
        self.grads = namespace.grads.default
        self.add_grad_ = namespace.add_grad_.default
        self.prox_ = namespace.prox_.default
        self.metric_prox_ = namespace.metric_prox_.default
        self.value = namespace.value.default
        self.penalty_value = namespace.penalty_value.default
        self.add_to_grad = namespace.add_to_grad.default
        self.bind_operands = namespace.bind_operands.default
        self.release_operands = namespace.release_operands.default
        self.penalty_value_of = namespace.penalty_value_of.default
        self.add_to_grad_of = namespace.add_to_grad_of.default
        self.watch_layout = namespace.watch_layout.default
        self.layout_changed = namespace.layout_changed.default
        self.release_layout = namespace.release_layout.default
        self.handles_held = namespace.handles_held.default
        self.watch_memory = namespace.watch_memory.default
        self.memory_changed = namespace.memory_changed.default
        self.release_memory = namespace.release_memory.default
        self.watch_targets = namespace.watch_targets.default
        self.targets_changed = namespace.targets_changed.default
        self.release_targets = namespace.release_targets.default
        self.defer_add_grad = namespace.defer_add_grad.default
        self.deferral_log = namespace.deferral_log.default
        self.gradient_routes = namespace.gradient_routes.default
        self.lock_accumulators = namespace.lock_accumulators.default
        self.unlock_accumulators = namespace.unlock_accumulators.default
