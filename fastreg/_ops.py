"""The differentiable op, registered with ``torch.library`` so torch.compile sees one opaque op.

``penalty_sums`` is the entry point: under torch.compile it is the registered op; in eager
mode it calls the same backend kernels through a thin ``autograd.Function``, because the
custom op's Python dispatch costs ~80 us a call (measured: 87 us vs 11 us for the kernels on
the seed article's 4-tensor MLP) — more than the whole penalty of a small model.

``fastreg::sums(params, centers, group_dims, group_sizes, backend, workspace) -> (sums,
group_sq)`` is the only differentiable primitive: ``sums[t] = [Σ|d|, Σd², Σ_g ‖d_g‖]`` of each
tensor (``d = w - c``; shape ``(T, 3)``), and the groups' squared norms; ``group_dims`` /
``group_sizes`` are each tensor's structure (``_geometry.Groups``). The coefficients stay
outside it (the value is formed from the sums in plain torch, per class of tensors sharing
settings), so tensor coefficients need no recompilation, and autograd hands the backward
exactly ``grad_sums[t] = [l1_t, l2_t, group_t] · grad_value``: each tensor's own coefficients.
The backward is ``grad_sums[t,0]·sign(d) + (2·grad_sums[t,1] + scale_g)·d`` with ``scale_g =
grad_sums[t,2] / ‖d_g‖ + 2·grad_group_sq[g]`` (0 for a zero group), computed by
``fastreg::sums_backward`` in one multi-tensor call. ``group_sq`` is an output so that sharded parameters can all-reduce it
(``fastreg._sharded``); ``scale`` is built from it with differentiable torch ops, so second
derivatives of the group term come out of autograd. Centers are constants (no gradient).
``workspace`` is the integer handle of the kernel group's ``Workspace`` (0: none), resolved
at run time, so a compiled graph keeps no reference to it.

The in-place primitives (``add_grad_``, ``prox_``) bump the version counters of what they write
when the backend's kernels write through raw pointers, as a PyTorch in-place op would.
"""

import contextlib
import functools
import sys
from typing import Optional

import torch

from fastreg import _dispatch
from fastreg.backends import _workspace
from fastreg.backends._geometry import (NO_GROUPS, Groups, acc_dtype, as_groups, group_sizes, logical_groups,
                                        scale_groups)
from fastreg.backends._terms import (SUMS, Gradient, MetricOperand, Prox, Sum, as_table, metric_multiplier,
                                     metric_shrink, metric_step, metric_values)



@torch.library.custom_op("fastreg::sums", mutates_args=())
def sums(params: list[torch.Tensor], centers: list[torch.Tensor], group_dims: list[int], group_sizes: list[int],
         backend: str, workspace: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-tensor [Σ|d|, Σd², Σ_g ‖d_g‖], group_sq)`` over one kernel group; ``backend`` as the
    user asked; ``workspace``: the handle of the kernel group's ``Workspace`` (0: none)."""
    _check_traced_group(params, centers)
    return _dispatch.backend_for(backend, params[0].device).sums(params, centers or None,
                                                                 Groups(tuple(group_dims), tuple(group_sizes)),
                                                                 workspace=_workspace.lookup(workspace))


def _check_traced_group(params, centers):
    """A graph traced by torch.compile runs the kernel group the plan had when it was traced;
    a parameter whose dtype, device or shape has changed since (``p.data = ...`` with no eager
    call in between, which the plan would have followed) must be an error, not a wrong number.
    Runs when the op runs, outside the trace."""
    first = params[0]
    for i, p in enumerate(params):
        if p.dtype != first.dtype or p.device != first.device:
            raise RuntimeError(f"fastreg: parameter {i} of a kernel group is {p.dtype} on {p.device}, the group "
                               f"{first.dtype} on {first.device}: a parameter changed dtype or device after this "
                               "graph was traced; call the penalty once outside torch.compile so that it follows")
    for i, (p, c) in enumerate(zip(params, centers)):
        if c.shape != p.shape or c.dtype != p.dtype:
            raise RuntimeError(f"fastreg: parameter {i} of a kernel group has shape {tuple(p.shape)} and dtype "
                               f"{p.dtype}, its center {tuple(c.shape)} and {c.dtype}: the parameter changed after "
                               "this graph was traced; call the penalty once outside torch.compile")


@sums.register_fake
def _(params, centers, group_dims, group_sizes_, backend, workspace):
    acc = acc_dtype(params[0].dtype)
    groups = Groups(tuple(group_dims), tuple(group_sizes_))
    return (params[0].new_empty((len(params), SUMS), dtype=acc),
            params[0].new_empty((sum(group_sizes(params, groups)),), dtype=acc))


@torch.library.custom_op("fastreg::sums_backward", mutates_args=())
def sums_backward(params: list[torch.Tensor], centers: list[torch.Tensor], group_dims: list[int],
                  group_sizes: list[int], coeffs: torch.Tensor, group_scale: Optional[torch.Tensor], backend: str,
                  workspace: int) -> list[torch.Tensor]:
    """``coeffs[t,0]·sign(d) + (2·coeffs[t,1] + group_scale[g])·d`` for every tensor of the group
    (``coeffs``: a Gradient table; its GROUP column is not read)."""
    _check_traced_group(params, centers)
    return _dispatch.backend_for(backend, params[0].device).grads(params, centers or None,
                                                                   Groups(tuple(group_dims), tuple(group_sizes)),
                                                                   coeffs, group_scale,
                                                                   workspace=_workspace.lookup(workspace))


@sums_backward.register_fake
def _(params, centers, group_dims, group_sizes_, coeffs, group_scale, backend, workspace):
    return [torch.empty_like(p) for p in params]


def group_scale(grad_norm_sums, counts, group_sq, grad_group_sq):
    """The per-group coefficient of ``d`` in the backward, or None without groups.
    ``grad_norm_sums``: each tensor's coefficient of its Σ‖d_g‖; ``counts``: its groups."""
    if group_sq.numel() == 0:
        return None
    per_group = torch.repeat_interleave(grad_norm_sums, torch.tensor(counts, device=group_sq.device),
                                        output_size=group_sq.numel())
    positive = group_sq > 0
    scale = torch.where(positive, per_group / torch.where(positive, group_sq, 1).sqrt(), 0)
    if grad_group_sq is not None:
        scale = scale + 2 * grad_group_sq
    return scale.to(group_sq.dtype)


def _backward_coeffs(grad_sums, params, groups, group_sq, grad_group_sq):
    """``(coeffs, scale)`` of the backward kernels: ``grad_sums`` itself (each row's first two
    entries are [c1, c2]; the kernels read those) and the per-group scale, or None without groups."""
    acc = group_sq.dtype
    if grad_sums is None:
        grad_sums = group_sq.new_zeros(len(params), SUMS)
    grad_sums = grad_sums.to(acc)
    if group_sq.numel() == 0 and grad_group_sq is None:
        return grad_sums, None
    return grad_sums, group_scale(grad_sums[:, Sum.GROUP_NORM], group_sizes(params, groups), group_sq, grad_group_sq)


def _sums_setup_context(ctx, inputs, output):
    params, centers, group_dims, group_sizes_, backend, workspace = inputs
    ctx.save_for_backward(*params, *centers, output[1])
    ctx.split = (len(params), Groups(tuple(group_dims), tuple(group_sizes_)), backend)
    ctx.workspace = workspace


def _unpack(ctx):
    count, groups, backend = ctx.split
    *tensors, group_sq = ctx.saved_tensors
    return tensors[:count], tensors[count:], group_sq, groups, backend


def _sums_backward(ctx, grad_sums, grad_group_sq):
    params, centers, group_sq, groups, backend = _unpack(ctx)
    coeffs, scale = _backward_coeffs(grad_sums, params, groups, group_sq, grad_group_sq)
    # A list input takes a list of gradients: none for the centers (constants). The kernels read
    # each row's L1 and L2; the group term comes as the per-group scale.
    return (sums_backward(params, centers, list(groups.dims), list(groups.sizes), coeffs.contiguous(), scale, backend,
                          ctx.workspace),
            [None] * len(centers), None, None, None, None)


sums.register_autograd(_sums_backward, setup_context=_sums_setup_context)


# Second order (gradgradcheck, Hessian-vector products): the backward is linear in d for a
# given scale, except for sign(), whose derivative is zero almost everywhere. Plain torch ops.
def _sums_backward_setup_context(ctx, inputs, output):
    params, centers, group_dims, group_sizes_, coeffs, scale, backend, workspace = inputs
    ctx.save_for_backward(coeffs, scale, *params, *centers)
    ctx.split = (len(params), Groups(tuple(group_dims), tuple(group_sizes_)), scale is not None)


def _sums_backward_backward(ctx, grad_outputs):
    count, groups, has_scale = ctx.split
    coeffs, scale, *tensors = ctx.saved_tensors
    params, centers = tensors[:count], tensors[count:]
    acc = coeffs.dtype  # fp16 dot products would overflow
    ds = [p - c for p, c in zip(params, centers)] if centers else list(params)
    vs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_outputs)]
    sign_dot = torch.stack([(torch.sign(d) * v).sum(dtype=acc) for d, v in zip(ds, vs)])
    value_dot = torch.stack([(d * v).sum(dtype=acc) for d, v in zip(ds, vs)])
    grad_params = [v * (2 * coeffs[i, Gradient.L2]).to(v.dtype) for i, v in enumerate(vs)]
    grad_scale = None
    if has_scale:
        per_group, start = [], 0
        for i, (d, v, n) in enumerate(zip(ds, vs, group_sizes(params, groups))):
            dim, size = groups.dims[i], groups.sizes[i]
            if dim == NO_GROUPS:
                continue
            grad_params[i] = grad_params[i] + scale_groups(v, dim, size, scale[start:start + n].to(v.dtype))
            per_group.append(logical_groups((d * v).to(acc), dim, size).sum(dim=1))
            start += n
        grad_scale = torch.cat(per_group) if per_group else scale.new_zeros(0)
    # The GROUP column of coeffs is not read (the group term is in the scale): its gradient is 0.
    grad_coeffs = torch.stack([sign_dot, 2 * value_dot, torch.zeros_like(sign_dot)], dim=1)[:, :coeffs.shape[1]]
    grad_coeffs = grad_coeffs.to(coeffs.dtype)
    return grad_params, [None] * len(centers), None, None, grad_coeffs, grad_scale, None, None


sums_backward.register_autograd(_sums_backward_backward, setup_context=_sums_backward_setup_context)


def penalty_sums(params, centers, groups, backend, workspace=None):
    """``(sums, group_sq)`` of one kernel group, differentiable: the op when compiling, else the fast path.

    ``groups``: each tensor's structure (``_geometry.Groups``, or one group_dim); ``workspace``:
    the kernel group's ``Workspace`` (where a backend keeps its tables), or None.
    """
    centers = centers or []
    groups = as_groups(params, groups)
    if torch.compiler.is_compiling():
        return sums(params, centers, list(groups.dims), list(groups.sizes), backend,
                    0 if workspace is None else workspace.handle)
    return _EagerSums.apply(backend, groups, len(params), workspace, *params, *centers)


class _EagerSums(torch.autograd.Function):
    """The eager twin of ``fastreg::sums``: same kernels, same backward, no op dispatch.

    Its backward hands autograd the penalty's gradient like any op does, and autograd does the
    rest: it adds it to the task's gradient of the same leaf, runs every hook (tensor hooks,
    hooks on the AccumulateGrad node, post-accumulate-grad hooks) and accumulates into
    ``p.grad`` by its own rules. (An earlier fast path wrote into ``p.grad`` here and reused the
    memory of earlier gradients; it could not prove that no one held that memory or watched
    the AccumulateGrad node, so it is gone: see ``tests/test_ownership.py``.)
    """

    @staticmethod
    def forward(ctx, backend, groups, count, workspace, *tensors):
        params, centers = list(tensors[:count]), list(tensors[count:])
        result, group_sq = _dispatch.backend_for(backend, params[0].device).sums(params, centers or None, groups,
                                                                                  workspace=workspace)
        ctx.save_for_backward(*tensors, group_sq)
        ctx.split = (count, groups, backend)
        ctx.workspace = workspace
        ctx.set_materialize_grads(False)
        return result, group_sq

    @staticmethod
    def backward(ctx, grad_sums, grad_group_sq):
        params, centers, group_sq, groups, backend = _unpack(ctx)
        grads = _param_gradients(params, centers, group_sq, groups, backend, ctx.workspace, grad_sums, grad_group_sq)
        return (None, None, None, None, *grads, *([None] * len(centers)))


def _param_gradients(params, centers, group_sq, groups, backend, workspace, grad_sums, grad_group_sq,
                     deferrable=True):
    """The backward of the sums of one kernel group: the gradient of each param to hand autograd
    (None for all where it is added at the end of the backward instead)."""
    if deferrable and _defer_to_end_of_backward(params, centers, group_sq, groups, backend, grad_sums,
                                                grad_group_sq, workspace):
        return [None] * len(params)
    coeffs, scale = _backward_coeffs(grad_sums, params, groups, group_sq, grad_group_sq)
    if torch.is_grad_enabled():  # create_graph=True: the op carries the second derivative
        handle = 0 if workspace is None else workspace.handle
        return sums_backward(params, centers, list(groups.dims), list(groups.sizes), coeffs.contiguous(), scale,
                             backend, handle)
    return _dispatch.backend_for(backend, params[0].device).grads(params, centers or None, groups, coeffs, scale,
                                                                  workspace=workspace)


def penalty_value(params, centers, groups, table, backend, workspace, dtype):
    """The penalty of one kernel group, ``Σ_t Σ_k table[t, k]·sums[t, k]`` (``table``: the
    ``Gradient`` table of the call, each tensor's [l1, l2, group]; a zero coefficient drops its
    term), as one autograd node in eager mode, in ``dtype``. For a plan without couplings or
    sharded parameters whose coefficients need no gradient: the value formed per class with torch
    ops (``fastreg._coefficients``) costs a dozen small ops and autograd nodes per call, which is
    the whole cost of a small model's penalty."""
    node = getattr(_dispatch.backend_for(backend, params[0].device), "penalty_value", None)
    if node is not None and _plain(params, workspace):  # the backend's own node (cpu: csrc/value_node.cpp)
        return node(params, centers, groups, table, dtype, workspace)
    return _EagerValue.apply(backend, groups, len(params), workspace, table, dtype, *params, *(centers or []))


def weighted_total(sums, table, dtype):
    """``Σ table·sums`` with the zero coefficients' terms dropped (never inf·0), in float64."""
    products = sums.double() * table
    return torch.where(table != 0, products, 0).sum().to(dtype)


def _value_graph_backward(params, centers, group_dims, group_sizes_, table, grad_value):
    """``_EagerValue.backward`` under create_graph, for a backend's own value node (the cpu
    backend's C++ node calls it through the dispatcher: ``fastreg::value_graph_backward``, a
    CompositeImplicitAutograd kernel, so that autograd records what it does): the value formed
    again through the differentiable sums over aliases of the params, differentiated with a graph.
    Only the cpu backend has such a node."""
    groups = Groups(tuple(group_dims), tuple(group_sizes_))
    with torch.enable_grad():
        aliases = [p.view_as(p) for p in params]
        sums_, _ = penalty_sums(aliases, centers, groups, "cpu")
        again = weighted_total(sums_, table, grad_value.dtype)
    return list(torch.autograd.grad(again, aliases, grad_value, create_graph=True, allow_unused=True))


def _value_graph_backward_kernel(*args):
    # The kernel of fastreg::value_graph_backward: this module's function as it is now in
    # sys.modules (the op is registered once per process; fastreg may be imported again after
    # its modules were dropped from sys.modules, as a test of the import does).
    module = sys.modules.get(__name__)
    return getattr(module, "_value_graph_backward", _value_graph_backward)(*args)


def _register_value_graph_backward():
    """Defines ``fastreg::value_graph_backward`` once per process (the Library object is kept
    alive by the kernel it registers, which refers to this module's globals)."""
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key("fastreg::value_graph_backward", "CompositeImplicitAutograd")
        return None  # defined by an earlier import of this module
    except RuntimeError:  # no such operator yet
        pass
    library = torch.library.Library("fastreg", "FRAGMENT")
    library.define("value_graph_backward(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, "
                   "Tensor table, Tensor grad_value) -> Tensor?[]")
    library.impl("value_graph_backward", _value_graph_backward_kernel, "CompositeImplicitAutograd")
    return library


_library = _register_value_graph_backward()


class _EagerValue(torch.autograd.Function):
    """The value of one kernel group and its backward in one node: the kernels' sums, weighted by
    the coefficient table inside (see ``penalty_value``); the backward is ``_EagerSums``'
    with ``grad_sums = table · grad``.

    A backend may offer each direction as one call: ``value`` (the sums and their weighted total,
    the same ops as ``weighted_total``) and ``defer_add_grad`` (the deferred backward's conditions,
    and the addition queued as a C++ callback; -1 where the graph must carry the gradient, which
    then takes the path below). The table is kept as the call gives it: its products with float64
    values are exact, whatever its dtype.

    A backend may also offer the whole node, ``penalty_value`` (the cpu backend: the op
    ``fastreg_cpu::penalty_value`` with a C++ autograd node, ``csrc/value_node.cpp``), which
    ``penalty_value`` takes for plain tensors instead of this class: the same forward, and this
    backward's three ways in the same order (create_graph through ``_value_graph_backward``, the
    code below, called back through the dispatcher; the deferral; the gradient through the
    graph), with no Python between the engine and the kernels. This class remains the path of
    the other backends, of tensor subclasses, and of a build without the node."""

    @staticmethod
    def forward(ctx, backend, groups, count, workspace, table, dtype, *tensors):
        params, centers = list(tensors[:count]), list(tensors[count:])
        kernels = _dispatch.backend_for(backend, params[0].device)
        fused = getattr(kernels, "value", None)
        if fused is not None:
            total, group_sq = fused(params, centers, groups, table, dtype)
        else:
            result, group_sq = kernels.sums(params, centers or None, groups, workspace=workspace)
            total = weighted_total(result, table, dtype)
        ctx.save_for_backward(*tensors, group_sq)
        ctx.split = (count, groups, backend)
        ctx.workspace, ctx.table, ctx.kernels = workspace, table, kernels
        return total

    @staticmethod
    def backward(ctx, grad_value):
        params, centers, group_sq, groups, backend = _unpack(ctx)
        nones = (None, None, None, None, None, None)
        if torch.is_grad_enabled():
            # create_graph=True: the second derivative of the group term needs group_sq's own
            # dependence on the params, which this node's forward did not record: the value is
            # formed again through the differentiable sums, and differentiated with a graph — with
            # respect to aliases of the params, so that this inner differentiation reaches no
            # hook of theirs (the outer backward runs them, once, on the whole gradient).
            with torch.enable_grad():
                aliases = [p.view_as(p) for p in params]
                sums_, _ = penalty_sums(aliases, centers, groups, backend, ctx.workspace)
                again = weighted_total(sums_, ctx.table, grad_value.dtype)
            grads = torch.autograd.grad(again, aliases, grad_value, create_graph=True, allow_unused=True)
            return (*nones, *grads, *([None] * len(centers)))
        defer = getattr(ctx.kernels, "defer_add_grad", None)
        if defer is not None and not torch.is_anomaly_enabled() and _plain(params):
            if defer(params, centers, groups, ctx.table, grad_value, group_sq) >= 0:
                return (*nones, *([None] * (len(params) + len(centers))))
            deferrable = False  # the engine's state says the graph: no second look
        else:
            deferrable = True
        grad_sums = (ctx.table.double() * grad_value.double()).to(group_sq.dtype)
        grads = _param_gradients(params, centers, group_sq, groups, backend, ctx.workspace, grad_sums, None,
                                 deferrable)
        return (*nones, *grads, *([None] * len(centers)))


# ------------------------------------------------------------------------------------------
# The deferred backward: the penalty's gradient added to p.grad at the end of the backward.
#
# Handed to autograd, the penalty's gradient of a parameter is a fresh tensor that the engine
# then adds to the task's gradient of the same leaf (or, when the penalty's backward runs first
# under zero_grad(set_to_none=True), the task's gradient is added into it): about six passes
# over the parameters' bytes. Added at the end of the backward, after every AccumulateGrad has
# adopted the task's gradient as p.grad, it is one add_grad_ (read w, read and write g): what
# add_to_grad_ costs.
# It is taken only when no one can observe the difference (csrc/deferral.cpp says where the
# engine puts each gradient), that is when, for every param of the kernel group:
#   - the engine will accumulate its gradient into p.grad (a leaf, this is backward() and the
#     param is among its inputs — not autograd.grad, which returns gradients instead), or this
#     backward does not need it at all (backward(inputs=...) without it: no gradient, as before);
#   - no hook anywhere in this backward's graph (a tensor hook, retain_grad, post-accumulate-grad
#     hook, a hook on any node: DDP's reducer, FSDP, a hook on another parameter that reads this
#     p.grad before the end of the backward), and no anomaly mode (which checks each returned
#     gradient for NaN);
#   - it is a plain tensor (not a DTensor or other subclass) and the backward builds no graph
#     (create_graph=False), and the penalty's group_sq output is unused (sharded and coupled
#     values use it);
#   - the C++ extension that reads the engine's state is loaded (else: the graph, as before).
# The addition holds the locks AccumulateGrad holds for the same params, so a concurrent backward
# on shared params in another thread (Hogwild-style) never interleaves with it. p.grad ends with
# the same sum; the rounding differs where p.grad held a gradient before this backward (autograd
# adds task + penalty, then that into p.grad; here the task's part is added, then the penalty's).
# Each condition is tested in tests/test_deferred_backward.py against plain autograd.

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_TYPE_SET = frozenset(_PLAIN_TYPES)


def _plain(params, workspace=None):
    """Whether every param is a plain tensor (no subclass: a DTensor, or any other); with a
    ``workspace``, the answer kept there for this very list (a Python object's type is fixed)."""
    if workspace is None:
        return set(map(type, params)) <= _PLAIN_TYPE_SET
    entry = workspace.get(("plain", id(params)), lambda e: e[0] is params)
    if entry is None:
        entry = (params, set(map(type, params)) <= _PLAIN_TYPE_SET)
        workspace.put(("plain", id(params)), entry)
    return entry[1]


def _defer_to_end_of_backward(params, centers, group_sq, groups, backend, grad_sums, grad_group_sq, workspace):
    """True when the penalty's gradient will be added at the end of this backward (queued here)."""
    if grad_sums is None or grad_group_sq is not None or torch.is_grad_enabled() or torch.is_anomaly_enabled():
        return False  # (anomaly mode checks every node's returned gradient for NaN: keep it in the graph)
    if not _plain(params):
        return False
    routes = _dispatch.gradient_routes(params)
    if routes is None or _dispatch.ROUTE_GRAPH in routes:
        return False
    index = [i for i, route in enumerate(routes) if route == _dispatch.ROUTE_DEFERRED]
    if not index:
        return True  # this backward needs none of these gradients
    coeffs = grad_sums.to(group_sq.dtype)
    norms = group_sq.sqrt() if group_sq.numel() else None
    if len(index) < len(params):
        if norms is not None:
            norms = group_vector_subset(norms, params, groups, index)
        params, groups, coeffs = [params[i] for i in index], groups.subset(index), coeffs[index]
        centers = [centers[i] for i in index] if centers else centers
    torch.autograd.Variable._execution_engine.queue_callback(
        functools.partial(_add_deferred, backend, params, centers or None, groups, coeffs, norms, workspace))
    return True


def profiled(name):
    """A ``torch.profiler`` range named ``name`` while a profiler records, else nothing (a range
    costs ~5 µs, a check 0.1): fastreg's work that runs where no op of the caller's encloses it
    — the deferred addition at the end of a backward, an optimizer hook — shows as its own row
    (``python -m bench.step`` attributes a step's time to the penalty by these)."""
    return torch.autograd.profiler.record_function(name) if torch.autograd._profiler_enabled() else _NO_RANGE


_NO_RANGE = contextlib.nullcontext()


def _add_deferred(backend, params, centers, groups, coeffs, norms, workspace):
    """The end of the backward: ``p.grad += the penalty's gradient`` for every param, ``p.grad``
    as the engine left it (created, zeros, where the task did not reach the param; a sparse one
    made dense, as adding a dense gradient to it in the graph would)."""
    with profiled("fastreg::deferred_add_grad"), torch.no_grad(), _dispatch.accumulators_locked(params):
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                g = p.grad = torch.zeros_like(p, dtype=getattr(p, "grad_dtype", None) or p.dtype)
            elif g.layout != torch.strided:
                g = p.grad = g.to_dense()
            grads.append(g)
        add_grad_(backend, params, grads, centers, groups, coeffs, norms, workspace, want_sums=False)


def plain_sums(backend, params, centers, groups, shrink=None, workspace=None):
    """``(sums, group_sq)`` of one kernel group, not differentiable (sharded and coupled passes,
    prox norms); ``shrink``: a prox table (the sums of the shrunk values) or None."""
    return _dispatch.backend_for(backend, params[0].device).sums(params, centers, groups, shrink,
                                                                 workspace=workspace)


def add_grad_(backend, params, grads, centers, groups, coeffs, group_norms=None, workspace=None, want_sums=True):
    """``grads[i] += d(penalty)/d params[i]`` in place (any gradient dtypes); ``(sums, group_sq)``,
    or None with ``want_sums=False``. Bumps the gradients' version counters, as a PyTorch
    in-place op does."""
    kernels = _dispatch.backend_for(backend, params[0].device)
    if not kernels.VERSIONS_BUMPED:
        check_writable(grads)
    result = add_grad_by_dtype(kernels, params, grads, centers, as_groups(params, groups), coeffs, group_norms,
                               workspace, want_sums)
    if not kernels.VERSIONS_BUMPED:
        torch.autograd.graph.increment_version(grads)
    return result


def add_to_grad_value(backend, params, centers, groups, table, workspace=None):
    """``p.grad += d(penalty)/dp`` for one kernel group (``p.grad`` created where None; versions
    bumped) and its value, ``weighted_total`` of the sums in the acc dtype, in one call of the
    backend's own entry (the cpu backend: ``csrc/add_to_grad.cpp``); None, having written nothing,
    where the backend has none or leaves these gradients to the caller's general path (one it
    would refuse, or several gradient dtypes). ``table``: the call's ``Gradient`` table."""
    one_call = getattr(_dispatch.backend_for(backend, params[0].device), "add_to_grad", None)
    if one_call is None or not _plain(params, workspace):
        return None
    return one_call(params, centers, groups, table, workspace)


def prox_(backend, params, centers, groups, coeffs, group_norms=None, workspace=None, metric=None):
    """The proximal step, in place on ``params``; bumps their version counters. ``metric``: one
    ``_terms.Metric`` (or None: D = 1) per param for the step in that metric, or None (Euclidean).
    The backend takes it as ``MetricOperand``s, one call per metric dtype (in a fixed order); a
    backend without the metric step in its kernels (``METRIC_PROX`` false) hands it to the torch
    backend, whose step is the reference."""
    kernels = _dispatch.backend_for(backend, params[0].device)
    if metric is not None and not getattr(kernels, "METRIC_PROX", False):
        kernels = _dispatch.backend("torch")
    if not kernels.VERSIONS_BUMPED:
        check_writable(params)
    if metric is None:
        kernels.prox_(params, centers, groups, coeffs, group_norms, workspace=workspace)
    else:
        groups = as_groups(params, groups)
        table = as_table(coeffs, len(params), Prox)
        for index in _metric_dtype_calls(metric, params):
            sub = [params[i] for i in index]
            operand = MetricOperand.of([metric[i] for i in index], sub, acc_dtype(params[0].dtype))
            kernels.prox_(sub, None if centers is None else [centers[i] for i in index], groups.subset(index),
                          table[index], None, workspace=workspace, metric=operand)
    if not kernels.VERSIONS_BUMPED:
        torch.autograd.graph.increment_version(params)


def coupled_metric_prox_(slices, reduce=None):
    """The step in a metric of one coupling: ``slices`` are ``(param, center, metric, row, dim,
    size)`` (``metric`` a ``_terms.Metric`` or None, ``row`` the param's Prox row), whose groups
    along ``dim`` together form the coupling's groups. Each group's multiplier is the root for
    all its slices at once (their ``u`` and ``a`` side by side), so the slices cannot go through
    separate kernel calls: torch ops in float64 (``_terms``' reference maths), the parameters
    written with ``copy_`` (version counters bumped by torch).

    ``reduce``: None, or the hook of ``_terms.metric_multiplier`` that combines each group's
    sums, minima and maxima with those of its parts on other ranks (``fastreg._sharded``: the
    local shard of a parameter whose groups span shards, one slice)."""
    with torch.autocast(slices[0][0].device.type, enabled=False):
        shrunk = []
        for p, c, metric, row, dim, size in slices:
            y = p.to(torch.float64, copy=True)
            if c is not None:
                y.sub_(c)
            D = (torch.ones_like(y) if metric is None else
                 metric_values(metric.v, metric.centered, _metric_row(metric, y), torch.float64))
            shrunk.append(metric_shrink(y, D, row.double()))
        row = slices[0][3].double()
        u_rows = torch.cat([logical_groups(u, dim, size) for (u, _), (*_, dim, size) in zip(shrunk, slices)], dim=1)
        a_rows = torch.cat([logical_groups(a, dim, size) for (_, a), (*_, dim, size) in zip(shrunk, slices)], dim=1)
        mu, shift, spread = metric_multiplier(u_rows, a_rows, row[Prox.GROUP_THRESHOLD], row[Prox.MIN_NORM],
                                              row[Prox.MAX_NORM], reduce=reduce)
        for (u, a), (p, c, _, _, dim, size) in zip(shrunk, slices):
            x = metric_step(u, a, mu, shift, spread, dim, size)
            if c is not None:
                x = x + c.double()
            p.copy_(x.to(acc_dtype(p.dtype)))


def _metric_row(metric, like):
    """A ``Metric``'s row of a metric table (``MetricSlot`` columns), float64 on ``like``'s device."""
    return MetricOperand.of([metric], [like], torch.float64).table[0]


def _metric_dtype_calls(metric, params):
    """The indices of each backend call of a metric step: one call per dtype of the metric
    tensors (a param without a metric joins the first), all of them when there is one."""
    dtypes = sorted({m.v.dtype for m in metric if m is not None}, key=str) or [None]
    calls = {dtype: [] for dtype in dtypes}
    for i, m in enumerate(metric):
        calls[dtypes[0] if m is None else m.v.dtype].append(i)
    return [index for index in calls.values() if index]


def check_writable(tensors):
    """What a PyTorch in-place op refuses, raw kernels must refuse too: an inference tensor
    outside ``torch.inference_mode`` (it has no version counter to bump)."""
    if not torch.is_inference_mode_enabled() and any(map(torch.Tensor.is_inference, tensors)):
        raise RuntimeError("fastreg: inplace update to an inference tensor outside InferenceMode is not allowed "
                           "(as for any PyTorch in-place op); clone it, or call this inside torch.inference_mode()")


def group_vector_subset(vector, params, groups, index):
    """The entries of a group vector (one per group, tensor after tensor) that belong to the
    tensors ``index``, in that order: the group vector of the call on ``params[i] for i in index``."""
    sizes = group_sizes(params, groups)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.cat([vector[starts[i]:starts[i] + sizes[i]] for i in index])


def add_grad_by_dtype(kernels, params, grads, centers, groups, coeffs, group_norms, workspace=None,
                      want_sums=True):
    """``kernels.add_grad_`` with gradients of any dtypes: one call per gradient dtype (in a fixed
    order), per-tensor rows and group vectors split and rejoined in parameter order. Returns
    ``(sums, group_sq)``, or None when the sums are not wanted."""
    first = grads[0].dtype
    if all(g.dtype == first for g in grads):
        return kernels.add_grad_(params, grads, centers, groups, coeffs, group_norms, workspace=workspace,
                                 want_sums=want_sums)
    table = as_table(coeffs, len(params), Gradient)
    sizes = group_sizes(params, groups)
    rows, pieces = [None] * len(params), [None] * len(params)
    for dtype in sorted({g.dtype for g in grads}, key=str):
        index = [i for i, g in enumerate(grads) if g.dtype == dtype]
        norms = None
        if group_norms is not None:
            norms = group_vector_subset(group_norms, params, groups, index)
        result = kernels.add_grad_([params[i] for i in index], [grads[i] for i in index],
                                   None if centers is None else [centers[i] for i in index],
                                   groups.subset(index), table[index], norms, workspace=workspace,
                                   want_sums=want_sums)
        if not want_sums:
            continue
        per_tensor, group_sq = result
        offset = 0
        for k, i in enumerate(index):
            rows[i] = per_tensor[k]
            pieces[i] = group_sq[offset:offset + sizes[i]]
            offset += sizes[i]
    if not want_sums:
        return None
    return torch.stack(rows), torch.cat(pieces)
