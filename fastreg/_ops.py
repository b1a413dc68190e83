"""The differentiable op, registered with ``torch.library`` so torch.compile sees one opaque op.

``penalty_sums`` is the entry point: under torch.compile it is the registered op; in eager
mode it calls the same backend kernels through a thin ``autograd.Function``, because the
custom op's Python dispatch costs ~80 us a call (measured: 87 us vs 11 us for the kernels on
the seed article's 4-tensor MLP) — more than the whole penalty of a small model.

``fastreg::sums(params, centers, group_dim, backend) -> (sums, group_sq)`` is the only
differentiable primitive: ``sums = [Σ|d|, Σd², Σ_g ‖d_g‖]`` with ``d = w - c``, and the
groups' squared norms. The coefficients stay outside it (``value = l1·s0 + l2·s1 +
group·s2`` in plain torch), so tensor coefficients need no recompilation, and autograd hands
the backward exactly ``grad_sums = [l1, l2, group] · grad_value``. The backward is
``grad_sums[0]·sign(d) + (2·grad_sums[1] + scale_g)·d`` with ``scale_g = grad_sums[2] / ‖d_g‖
+ 2·grad_group_sq[g]`` (0 for a zero group), computed by ``fastreg::sums_backward`` in one
multi-tensor call. ``group_sq`` is an output so that sharded parameters can all-reduce it
(``fastreg._sharded``); ``scale`` is built from it with differentiable torch ops, so second
derivatives of the group term come out of autograd. Centers are constants (no gradient).
"""

import sys
from typing import Optional

import torch

from fastreg import _dispatch
from fastreg.backends._geometry import fixed_order_sum, group_sizes


@torch.library.custom_op("fastreg::sums", mutates_args=())
def sums(params: list[torch.Tensor], centers: list[torch.Tensor], group_dim: int,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``([Σ|d|, Σd², Σ_g ‖d_g‖], group_sq)`` over one kernel group; ``backend`` as the user asked."""
    return _dispatch.backend_for(backend, params[0].device).sums(params, centers or None, group_dim)


@sums.register_fake
def _(params, centers, group_dim, backend):
    acc = _dispatch.acc_dtype(params[0].dtype)
    return (params[0].new_empty((3,), dtype=acc),
            params[0].new_empty((sum(group_sizes(params, group_dim)),), dtype=acc))


@torch.library.custom_op("fastreg::sums_backward", mutates_args=())
def sums_backward(params: list[torch.Tensor], centers: list[torch.Tensor], group_dim: int,
                  coeffs: torch.Tensor, group_scale: Optional[torch.Tensor], backend: str) -> list[torch.Tensor]:
    """``coeffs[0]·sign(d) + (2·coeffs[1] + group_scale[g])·d`` for every tensor of the group."""
    return _dispatch.backend_for(backend, params[0].device).grads(params, centers or None, group_dim,
                                                                   coeffs, group_scale)


@sums_backward.register_fake
def _(params, centers, group_dim, coeffs, group_scale, backend):
    return [torch.empty_like(p) for p in params]


def group_scale(grad_norm_sum, group_sq, grad_group_sq):
    """The per-group coefficient of ``d`` in the backward, or None without groups."""
    if group_sq.numel() == 0:
        return None
    positive = group_sq > 0
    scale = torch.where(positive, grad_norm_sum / torch.where(positive, group_sq, 1).sqrt(), 0)
    if grad_group_sq is not None:
        scale = scale + 2 * grad_group_sq
    return scale.to(group_sq.dtype)


def _backward_coeffs(grad_sums, group_sq, grad_group_sq):
    """``(coeffs, scale)`` of the backward kernels: ``grad_sums`` itself (its first two entries
    are [c1, c2]; the kernels read those) and the per-group scale, or None without groups."""
    acc = group_sq.dtype
    if grad_sums is None:
        grad_sums = group_sq.new_zeros(3)
    grad_sums = grad_sums.to(acc)
    if group_sq.numel() == 0 and grad_group_sq is None:
        return grad_sums, None
    return grad_sums, group_scale(grad_sums[2], group_sq, grad_group_sq)


def _sums_setup_context(ctx, inputs, output):
    params, centers, group_dim, backend = inputs
    ctx.save_for_backward(*params, *centers, output[1])
    ctx.split = (len(params), group_dim, backend)


def _unpack(ctx):
    count, group_dim, backend = ctx.split
    *tensors, group_sq = ctx.saved_tensors
    return tensors[:count], tensors[count:], group_sq, group_dim, backend


def _sums_backward(ctx, grad_sums, grad_group_sq):
    params, centers, group_sq, group_dim, backend = _unpack(ctx)
    coeffs, scale = _backward_coeffs(grad_sums, group_sq, grad_group_sq)
    # A list input takes a list of gradients: none for the centers (constants).
    return (sums_backward(params, centers, group_dim, coeffs[:2].contiguous(), scale, backend), [None] * len(centers),
            None, None)


sums.register_autograd(_sums_backward, setup_context=_sums_setup_context)


# Second order (gradgradcheck, Hessian-vector products): the backward is linear in d for a
# given scale, except for sign(), whose derivative is zero almost everywhere. Plain torch ops.
def _sums_backward_setup_context(ctx, inputs, output):
    params, centers, group_dim, coeffs, scale, backend = inputs
    ctx.save_for_backward(coeffs, scale, *params, *centers)
    ctx.split = (len(params), group_dim, scale is not None)


def _sums_backward_backward(ctx, grad_outputs):
    count, group_dim, has_scale = ctx.split
    coeffs, scale, *tensors = ctx.saved_tensors
    params, centers = tensors[:count], tensors[count:]
    acc = coeffs.dtype  # fp16 dot products would overflow
    ds = [p - c for p, c in zip(params, centers)] if centers else list(params)
    vs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_outputs)]
    sign_dot = sum(((torch.sign(d) * v).sum(dtype=acc) for d, v in zip(ds, vs)), coeffs.new_zeros(()))
    value_dot = sum(((d * v).sum(dtype=acc) for d, v in zip(ds, vs)), coeffs.new_zeros(()))
    grad_params = [v * (2 * coeffs[1]).to(v.dtype) for v in vs]
    grad_scale = None
    if has_scale:
        per_group, start = [], 0
        for i, (d, v, n) in enumerate(zip(ds, vs, group_sizes(params, group_dim))):
            if d.ndim < 2:
                continue
            s = scale[start:start + n]
            grad_params[i] = grad_params[i] + (v.movedim(group_dim, -1) * s.to(v.dtype)).movedim(-1, group_dim)
            per_group.append((d * v).to(acc).movedim(group_dim, 0).reshape(n, -1).sum(dim=1))
            start += n
        grad_scale = torch.cat(per_group) if per_group else scale.new_zeros(0)
    grad_coeffs = torch.stack([sign_dot, 2 * value_dot]).to(coeffs.dtype)
    return grad_params, [None] * len(centers), None, grad_coeffs, grad_scale, None


sums_backward.register_autograd(_sums_backward_backward, setup_context=_sums_backward_setup_context)


def penalty_sums(params, centers, group_dim, backend, accumulators=None):
    """``(sums, group_sq)`` of one kernel group, differentiable: the op when compiling, else the fast path.

    ``accumulators``: the parameters' ``DirectTargets`` (leaves only), which lets the eager
    backward add the penalty's gradient straight into ``p.grad`` (see ``_EagerSums``).
    """
    centers = centers or []
    if torch.compiler.is_compiling():
        return sums(params, centers, group_dim, backend)
    return _EagerSums.apply(backend, group_dim, len(params), accumulators, *params, *centers)


class _EagerSums(torch.autograd.Function):
    """The eager twin of ``fastreg::sums``: same kernels, same backward, no op dispatch.

    **Direct accumulation.** When ``loss.backward()`` will accumulate into every parameter's
    ``.grad`` anyway, the backward adds the penalty's gradient into ``p.grad`` itself, in one
    fused in-place pass, and hands autograd no gradient for ``p``: no fresh gradient tensors
    (on a CPU, fresh large tensors cost page faults: 112 ms to fill 500 MB, 12 ms reused) and
    no per-tensor work in the engine. The engine's own rules keep this exact: the parameter's
    AccumulateGrad node runs only after this backward (it waits for all its inputs), so a task
    gradient arriving through another path is then added in place to the ``p.grad`` this pass
    created or updated, and hooks registered on the AccumulateGrad node still run after it.
    Taken only when it cannot change what anyone observes, for the whole group at once:

    * not ``create_graph=True`` (gradients must then be differentiable: the op path);
    * every parameter's AccumulateGrad node will run in this backward (not
      ``torch.autograd.grad``, not ``backward(inputs=...)`` without it);
    * no tensor hooks on the parameters (``p.register_hook`` must see the whole gradient)
      and no post-accumulate-grad hooks;
    * every ``p.grad`` is None (created here: fresh, or zeros in ``p.grad_dtype`` then added),
      or every ``p.grad`` is a dense tensor of ``p``'s shape and device (added in place, in
      its own dtype).

    Otherwise the gradients are returned to autograd as usual.
    """

    @staticmethod
    def forward(ctx, backend, group_dim, count, accumulators, *tensors):
        params, centers = list(tensors[:count]), list(tensors[count:])
        result, group_sq = _dispatch.backend_for(backend, params[0].device).sums(params, centers or None, group_dim)
        ctx.save_for_backward(*tensors, group_sq)
        ctx.split = (count, group_dim, backend)
        ctx.accumulators = accumulators
        ctx.set_materialize_grads(False)
        return result, group_sq

    @staticmethod
    def backward(ctx, grad_sums, grad_group_sq):
        params, centers, group_sq, group_dim, backend = _unpack(ctx)
        coeffs, scale = _backward_coeffs(grad_sums, group_sq, grad_group_sq)
        if torch.is_grad_enabled():  # create_graph=True: the op carries the second derivative
            grads = sums_backward(params, centers, group_dim, coeffs[:2].contiguous(), scale, backend)
        elif grad_group_sq is None and _accumulate_directly(ctx.accumulators, params, centers, group_dim, coeffs,
                                                            scale, coeffs if grad_sums is not None else None,
                                                            group_sq, backend):
            grads = [None] * len(params)
        else:
            grads = _dispatch.backend_for(backend, params[0].device).grads(params, centers or None, group_dim,
                                                                            coeffs, scale)
        return (None, None, None, None, *grads, *([None] * len(centers)))


REUSE_MIN_AVERAGE_ELEMENTS = 1 << 16  # reuse spare gradients when tensors average at least this size


class DirectTargets:
    """What the eager backward needs to add the penalty's gradient straight into ``p.grad``.

    ``nodes``: every parameter's AccumulateGrad node (held, so their identity stays). ``spare``:
    on CPU, for parameters of at least ``REUSE_MIN_AVERAGE_ELEMENTS`` on average, the gradient
    tensors this backward created at its latest step. After ``zero_grad(set_to_none=True)`` they are garbage unless someone still holds them; reusing
    their memory at the next step saves the page faults of a fresh allocation (112 ms to fill a
    fresh 500 MB buffer here, 12 ms a reused one), which is most of what creating gradients
    costs on a CPU. A spare is reused only when provably unreferenced: no other Python
    reference, no other C++ owner (autograd graphs, optimizers' C++ state), no view of its
    storage (DDP buckets, user slices). The price: between ``zero_grad(set_to_none=True)`` and
    the next backward, the gradients' memory stays allocated.
    """

    __slots__ = ("nodes", "spare", "reuse")

    def __init__(self, nodes, params):
        self.nodes = nodes
        self.spare = None
        # Only fresh allocations above malloc's mmap threshold (128 KB by default) page-fault; the
        # checks cost ~3.5 us a tensor (7 ms a step on 2,000 tensors of 1,000 elements, where a
        # fresh allocation is cheap). A GPU's caching allocator already reuses memory.
        self.reuse = (params[0].device.type == "cpu"
                      and sum(p.numel() for p in params) >= REUSE_MIN_AVERAGE_ELEMENTS * len(params))

    def take_spare(self, params, dtypes):
        """The spare gradients, zeroed, if each is unreferenced and fits its parameter; else None."""
        spare, self.spare = self.spare, None
        if spare is None or len(spare) != len(params):
            return None
        for i, (p, dtype) in enumerate(zip(params, dtypes)):
            if _references(spare, i) != _SOLE_REFERENCE or not _unshared(spare[i]):
                return None
            g = spare[i]
            if g.shape != p.shape or g.dtype != dtype or g.device != p.device or g.stride() != p.stride():
                return None
        torch._foreach_zero_(spare)
        return spare


def _references(holder, i):
    return sys.getrefcount(holder[i])


def _storage_uses(tensor):
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


# The counts of a tensor held by one list and nothing else, measured the same way (so the test
# does not depend on how this Python version counts the references a call makes).
_SOLE_REFERENCE = _references([torch.empty(1)], 0)
_SOLE_STORAGE_USE = _storage_uses(torch.empty(1))


def _unshared(tensor):
    return (type(tensor) is torch.Tensor and tensor.layout == torch.strided and tensor._use_count() == 1
            and _storage_uses(tensor) == _SOLE_STORAGE_USE and tensor.storage_offset() == 0)


def accumulators_of(params):
    """``DirectTargets`` of the parameters, or None unless all are leaves requiring grad."""
    if not all(p.is_leaf and p.requires_grad and type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        return None
    with torch.enable_grad():
        return DirectTargets([p.view_as(p).grad_fn.next_functions[0][0] for p in params], params)


def _accumulate_directly(targets, params, centers, group_dim, coeffs, scale, grad_sums, group_sq, backend):
    """Add the penalty's gradient into every ``p.grad`` (see ``_EagerSums``); False if not safe."""
    if targets is None or grad_sums is None:
        return False
    try:
        if not all(map(torch._C._will_engine_execute_node, targets.nodes)):
            return False
    except RuntimeError:  # torch.autograd.grad(): the leaves' accumulators do not run
        return False
    if any(p._backward_hooks or p._post_accumulate_grad_hooks for p in params):
        return False
    grads = [p.grad for p in params]
    kernels = _dispatch.backend_for(backend, params[0].device)
    if all(g is None for g in grads):
        dtypes = [getattr(p, "grad_dtype", None) or p.dtype for p in params]
        reuse = targets.reuse
        grads = targets.take_spare(params, dtypes) if reuse else None
        if grads is None and all(d == p.dtype for d, p in zip(dtypes, params)):
            fresh = kernels.grads(params, centers or None, group_dim, coeffs, scale)
            for p, g in zip(params, fresh):
                p.grad = g
            targets.spare = fresh if reuse else None
            return True
        if grads is None:
            grads = [torch.zeros_like(p, dtype=d) for p, d in zip(params, dtypes)]  # the grad_dtype asked for
        for p, g in zip(params, grads):
            p.grad = g
        targets.spare = grads if reuse else None
    # (p.grad's setter has checked devices; a parameter whose data was replaced can hold a stale
    # shape, and a sparse gradient another layout: those go the usual way.)
    elif not all(g is not None and g.layout == torch.strided and g.shape == p.shape and type(g) is torch.Tensor
                 for g, p in zip(grads, params)):
        return False
    # g += c1·sign(d) + 2·c2·d + c3·d_g/‖d_g‖, [c1, c2, c3] = grad_sums; the norms are the forward's.
    norms = group_sq.sqrt() if group_dim >= 0 and group_sq.numel() else None
    add_grad_by_dtype(kernels, params, grads, centers or None, group_dim, grad_sums.to(group_sq.dtype), norms)
    return True


def add_grad_by_dtype(kernels, params, grads, centers, group_dim, coeffs, group_norms):
    """``kernels.add_grad_`` with gradients of any dtypes: one call per gradient dtype (in a fixed
    order), group vectors split and rejoined in parameter order. Returns ``(sums, group_sq)``."""
    first = grads[0].dtype
    if all(g.dtype == first for g in grads):
        return kernels.add_grad_(params, grads, centers, group_dim, coeffs, group_norms)
    sizes = group_sizes(params, group_dim)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total, pieces = None, [None] * len(params)
    for dtype in sorted({g.dtype for g in grads}, key=str):
        index = [i for i, g in enumerate(grads) if g.dtype == dtype]
        norms = None
        if group_norms is not None:
            norms = torch.cat([group_norms[starts[i]:starts[i] + sizes[i]] for i in index])
        result, group_sq = kernels.add_grad_([params[i] for i in index], [grads[i] for i in index],
                                             None if centers is None else [centers[i] for i in index],
                                             group_dim, coeffs, norms)
        offset = 0
        for i in index:
            pieces[i] = group_sq[offset:offset + sizes[i]]
            offset += sizes[i]
        total = result if total is None else total + result
    group_sq = torch.cat(pieces)
    # The group norm sum from the pieces' own sums would depend on the split: recompute it.
    return torch.cat([total[:2], fixed_order_sum(group_sq.double().sqrt()).reshape(1).to(total.dtype)]), group_sq
