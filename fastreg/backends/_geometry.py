"""What every backend agrees on: the accumulation dtype and where the groups of a tensor lie.

A *group* of a tensor ``w`` with ``group_dim = j`` is ``w.select(j, i)``: all elements whose
coordinate along dim ``j`` is ``i``. Only tensors with ``ndim >= 2`` have groups. The *group
vectors* of a call (``group_sq``, ``group_norms``, ``group_scale``) hold one entry per group,
tensor after tensor in call order, group ``i`` of a tensor at its offset plus ``i``; a tensor
without groups contributes no entries, an empty tensor with ``ndim >= 2`` contributes
``w.shape[j]`` zeros (so that every shard of a sharded parameter has the same group vector).

In memory, a dense tensor (contiguous in some dimension order) holds group ``(m // K) % G`` at
element offset ``m`` from its first element, where ``G = w.shape[j]`` and ``K = w.stride(j)``:
the memory is ``A`` repetitions of ``G`` runs of ``K`` elements. ``group_dim=0`` on a contiguous
weight gives ``A = 1`` (each group one contiguous run); ``group_dim=1`` gives ``A = w.shape[0]``
rows, each holding a run of every group (strided groups).
"""

import math

import torch

NO_GROUPS = -1
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype):
    """The accumulation and result dtype for ``dtype`` tensors: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_groups(tensor, group_dim):
    return group_dim >= 0 and tensor.ndim >= 2


def group_sizes(tensors, group_dim):
    """The number of group-vector entries of each tensor."""
    if group_dim < 0:
        return [0] * len(tensors)
    return [t.shape[group_dim] if t.ndim >= 2 else 0 for t in tensors]


def is_dense(t):
    """True when ``t``'s elements fill ``t.numel()`` consecutive slots from ``t.data_ptr()``
    (contiguous in some order of its dimensions: ``w.t()``, channels-last, ...)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def memory_geometry(tensor, group_dim):
    """``(A, G, K)`` of a dense tensor with groups: see the module docstring.

    A group dimension of size 1 is one group holding everything (``A = 1, K = numel``).
    """
    groups = tensor.shape[group_dim]
    numel = tensor.numel()
    if groups <= 1 or numel == 0:
        return 1, groups, numel
    run = tensor.stride(group_dim)
    return numel // (groups * run), groups, run


def logical_groups(tensor, group_dim):
    """A ``(G, numel // G)`` view or copy of ``tensor`` whose row ``i`` is group ``i``."""
    groups = tensor.shape[group_dim]
    return tensor.movedim(group_dim, 0).reshape(groups, math.prod(tensor.shape) // max(groups, 1))


ROW_ELEMS = 4096  # rows reduced by one thread each: bitwise the same for any thread count


def fixed_order_sum(values):
    """The sum of a 1-D tensor in an order that does not depend on the thread count.

    ATen reduces each row of a contiguous ``(rows, n)`` tensor on one thread (rows > 1), and
    below 32768 elements does not split a reduction at all: rows of 4096, then rows of the
    row sums, until one row is left.
    """
    while values.numel() > ROW_ELEMS:
        rows = -(-values.numel() // ROW_ELEMS)
        padded = values.new_zeros(rows * ROW_ELEMS)
        padded[: values.numel()] = values
        values = padded.view(rows, ROW_ELEMS).sum(dim=1)
    return values.sum()
