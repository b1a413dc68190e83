"""What every backend agrees on: the accumulation dtype and where the groups of a tensor lie.

Each tensor of a call has a *structure*, one entry of a ``Groups``: ``NO_GROUPS`` (no group
term), ``WHOLE`` (the whole tensor is one group), or a dimension ``j`` with a group size ``k``:
group ``i`` is the ``k`` consecutive slices ``w.select(j, i·k) .. w.select(j, i·k + k - 1)``
(``k = 1``: rows for ``j = 0``, columns for ``j = 1``; ``k = head_dim``: attention heads). The
plan decides every tensor's structure (``fastreg._plan``); a backend takes it as given. The
*group vectors* of a call (``group_sq``, ``group_norms``, ``group_scale``) hold one entry per
group, tensor after tensor in call order, group ``i`` of a tensor at its offset plus ``i``; a
tensor without groups contributes no entries, an empty tensor with a dimension ``j`` contributes
``w.shape[j] // k`` zeros (so that every shard of a sharded parameter has the same group
vector), and a ``WHOLE`` tensor one entry.

In memory, a dense tensor (contiguous in some dimension order) holds group ``(m // K) % G`` at
element offset ``m`` from its first element, where ``G = w.shape[j] // k`` and ``K = k·w.stride(j)``:
the memory is ``A`` repetitions of ``G`` runs of ``K`` elements. ``group_dim=0`` on a contiguous
weight gives ``A = 1`` (each group one contiguous run); ``group_dim=1`` gives ``A = w.shape[0]``
rows, each holding a run of every group (strided groups); ``WHOLE`` is ``(1, 1, numel)``.
"""

import math
from typing import NamedTuple

import torch

NO_GROUPS = -1
WHOLE = -2  # the whole tensor is one group
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype):
    """The accumulation and result dtype for ``dtype`` tensors: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Groups(NamedTuple):
    """The structure of every tensor of a call: ``dims[i]`` (``NO_GROUPS``, ``WHOLE`` or a
    dimension) and ``sizes[i]`` (slices per group along that dimension; 1 otherwise)."""

    dims: tuple
    sizes: tuple

    @classmethod
    def uniform(cls, tensors, group_dim):
        """One ``group_dim`` (``NO_GROUPS``, 0, 1, ``WHOLE``) for every tensor, as before
        structures were per tensor: a dimension applies to the tensors with ``ndim >= 2``."""
        if group_dim == WHOLE:
            return cls((WHOLE,) * len(tensors), (1,) * len(tensors))
        return cls(tuple(group_dim if group_dim >= 0 and t.ndim >= 2 else NO_GROUPS for t in tensors),
                   (1,) * len(tensors))

    @property
    def any(self):
        return any(d != NO_GROUPS for d in self.dims)

    def subset(self, index):
        return Groups(tuple(self.dims[i] for i in index), tuple(self.sizes[i] for i in index))


def as_groups(tensors, groups):
    """``groups`` as a ``Groups``: an int is one ``group_dim`` for every tensor (``Groups.uniform``)."""
    return groups if isinstance(groups, Groups) else Groups.uniform(tensors, groups)


def has_groups(groups, i):
    return groups.dims[i] != NO_GROUPS


def group_count(tensor, dim, size=1):
    """The number of group-vector entries of ``tensor`` with structure ``(dim, size)``."""
    if dim == NO_GROUPS:
        return 0
    if dim == WHOLE:
        return 1
    return tensor.shape[dim] // size


def group_sizes(tensors, groups):
    """The number of group-vector entries of each tensor (``groups``: a ``Groups`` or one group_dim)."""
    groups = as_groups(tensors, groups)
    return [group_count(t, d, k) for t, d, k in zip(tensors, groups.dims, groups.sizes)]


def group_owners(counts, device):
    """The tensor index of every group-vector entry (``counts``: entries per tensor), on ``device``."""
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(counts, dtype=torch.long, device=device), output_size=sum(counts))


def is_dense(t):
    """True when ``t``'s elements fill ``t.numel()`` consecutive slots from ``t.data_ptr()``
    (contiguous in some order of its dimensions: ``w.t()``, channels-last, ...)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def memory_geometry(tensor, dim, size=1):
    """``(A, G, K)`` of a dense tensor with groups: see the module docstring.

    A tensor with one group (``WHOLE``, or a dimension holding one group) is ``(1, G, numel)``.
    """
    if dim == WHOLE:
        return 1, 1, tensor.numel()
    groups = tensor.shape[dim] // size
    numel = tensor.numel()
    if groups <= 1 or numel == 0:
        return 1, groups, numel
    run = tensor.stride(dim) * size
    return numel // (groups * run), groups, run


def logical_groups(tensor, dim, size=1):
    """A ``(G, numel // G)`` view or copy of ``tensor`` whose row ``i`` is group ``i``."""
    if dim == WHOLE:
        return tensor.reshape(1, -1)
    groups = tensor.shape[dim] // size
    return tensor.movedim(dim, 0).reshape(groups, math.prod(tensor.shape) // max(groups, 1))


def scale_groups(x, dim, size, per_group):
    """``per_group[g] · x_g`` for every element of ``x`` (structure ``(dim, size)``; torch ops,
    differentiable): the torch backend's update and the op's second derivative."""
    if dim == WHOLE:
        return x * per_group[0]
    if size > 1:
        per_group = per_group.repeat_interleave(size)
    return (x.movedim(dim, -1) * per_group).movedim(-1, dim)


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
