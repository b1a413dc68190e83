"""The differentiable op, registered with ``torch.library`` so torch.compile sees one opaque op.

``penalty_sums`` is the entry point: under torch.compile it is the registered op; in eager
mode it calls the same backend kernels through a thin ``autograd.Function``, because the
custom op's Python dispatch costs ~80 us a call (measured: 87 us vs 11 us for the kernels on
the seed article's 4-tensor MLP) — more than the whole penalty of a small model.

``fastreg::sums(params, backend) -> [Σ|w|, Σw²]`` is the only differentiable primitive. The
coefficients stay outside it (``value = l1 * sums[0] + l2 * sums[1]`` in plain torch), so
tensor coefficients need no recompilation, and autograd hands the backward exactly
``grad_sums = [l1, l2] * grad_value``: the backward is ``grad_sums[0]·sign(w) +
2·grad_sums[1]·w``, computed by ``fastreg::sums_backward`` in one multi-tensor call.
"""

import torch

from fastreg import _dispatch


@torch.library.custom_op("fastreg::sums", mutates_args=())
def sums(params: list[torch.Tensor], backend: str) -> torch.Tensor:
    """``[Σ|w|, Σw²]`` over one (device, dtype) group; ``backend`` as the user asked for it."""
    return _dispatch.backend_for(backend, params[0].device).sums(params)


@sums.register_fake
def _(params, backend):
    return params[0].new_empty((2,), dtype=_dispatch.acc_dtype(params[0].dtype))


@torch.library.custom_op("fastreg::sums_backward", mutates_args=())
def sums_backward(params: list[torch.Tensor], grad_sums: torch.Tensor, backend: str) -> list[torch.Tensor]:
    """``grad_sums[0]·sign(w) + 2·grad_sums[1]·w`` for every tensor of the group."""
    return _dispatch.backend_for(backend, params[0].device).grads(params, grad_sums)


@sums_backward.register_fake
def _(params, grad_sums, backend):
    return [torch.empty_like(p) for p in params]


def _sums_setup_context(ctx, inputs, output):
    params, backend = inputs
    ctx.save_for_backward(*params)
    ctx.backend = backend


def _sums_backward(ctx, grad_sums):
    params = list(ctx.saved_tensors)
    coeffs = grad_sums.to(_dispatch.acc_dtype(params[0].dtype)).contiguous()
    return sums_backward(params, coeffs, ctx.backend), None


sums.register_autograd(_sums_backward, setup_context=_sums_setup_context)


# Second order, for completeness (gradgradcheck, Hessian-vector products): the backward is
# linear in w except for sign(), whose derivative is zero almost everywhere. Plain torch ops.
def _sums_backward_setup_context(ctx, inputs, output):
    params, grad_sums, backend = inputs
    ctx.save_for_backward(grad_sums, *params)


def _sums_backward_backward(ctx, grad_outputs):
    grad_sums, *params = ctx.saved_tensors
    grad_outputs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_outputs)]
    grad_params = torch._foreach_mul(grad_outputs, 2 * grad_sums[1])
    acc = grad_sums.dtype  # fp16 dot products would overflow
    sign_dot = sum((torch.sign(p) * g).sum(dtype=acc) for p, g in zip(params, grad_outputs))
    value_dot = sum((p * g).sum(dtype=acc) for p, g in zip(params, grad_outputs))
    grad_grad_sums = torch.stack([sign_dot, 2 * value_dot]).to(grad_sums.dtype)
    return list(grad_params), grad_grad_sums, None


sums_backward.register_autograd(_sums_backward_backward, setup_context=_sums_backward_setup_context)


def penalty_sums(params, backend):
    """``[Σ|w|, Σw²]`` of one group, differentiable: the op when compiling, else the fast path."""
    if torch.compiler.is_compiling():
        return sums(params, backend)
    return _EagerSums.apply(backend, *params)


class _EagerSums(torch.autograd.Function):
    """The eager twin of ``fastreg::sums``: same kernels, same backward, no op dispatch."""

    @staticmethod
    def forward(ctx, backend, *params):
        ctx.backend = backend
        ctx.save_for_backward(*params)
        return _dispatch.backend_for(backend, params[0].device).sums(list(params))

    @staticmethod
    def backward(ctx, grad_sums):
        params = list(ctx.saved_tensors)
        coeffs = grad_sums.to(_dispatch.acc_dtype(params[0].dtype)).contiguous()
        if torch.is_grad_enabled():  # create_graph=True: the op carries the second derivative
            grads = sums_backward(params, coeffs, ctx.backend)
        else:
            grads = _dispatch.backend_for(ctx.backend, params[0].device).grads(params, coeffs)
        return (None, *grads)
