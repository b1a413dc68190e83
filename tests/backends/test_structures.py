"""The contract's per-tensor operands, on every backend: each tensor of one call has its own
structure (no groups, the whole tensor, blocks of k rows or columns, 1-D element groups) and its
own row of coefficients, prox constraints included, against float64 references computed here.

The shapes put blocks in every kind of task of the fused backends (contiguous runs, strided
runs, transposed, long); the Triton interpreter suite runs this file with smaller ones."""

import math

import pytest
import torch

import reference as ref
from fastreg import _dispatch
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups, acc_dtype, group_sizes
from fastreg.backends._terms import Gradient, Prox

LONG = 70000  # a WHOLE tensor longer than a chunk


def _cases():
    """(shape or maker, dim, size): every structure, contiguous and not."""
    g = torch.Generator().manual_seed(4)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return [
        (randn(12, 8), 0, 3),                  # blocks of 3 rows (heads): contiguous runs of 24
        (randn(6, 10), 1, 2),                  # blocks of 2 columns: strided
        (randn(9,), 0, 1),                     # a 1-D tensor: one group per element (a coupled bias)
        (randn(4, 3, 2), WHOLE, 1),            # the whole tensor
        (randn(7,), NO_GROUPS, 1),             # no group term
        (randn(0, 4), 0, 2),                   # empty, with groups
        (randn(10, 9).t(), 1, 5),              # transposed: blocks of 5 columns of the view
        (randn(LONG), WHOLE, 1),               # one long group
        (randn(16, 6, 3, 3).to(memory_format=torch.channels_last), 0, 4),  # conv filters in blocks
        (randn(50, 40)[:, ::4], 0, 5),         # not dense
        (randn(33, 65), 1, 13),                # odd sizes
        (randn(1), WHOLE, 1),
    ]


def _params(dtype):
    cases = _cases()
    params = [t.to(dtype) for t, _, _ in cases]
    return params, Groups(tuple(d for _, d, _ in cases), tuple(k for _, _, k in cases))


def _rows(x, dim, size):
    """Group ``g`` of a float64 tensor as row ``g`` (movedim + reshape, never memory geometry)."""
    if dim == WHOLE:
        return x.reshape(1, -1)
    n = x.shape[dim] // size
    return x.movedim(dim, 0).reshape(n, x.numel() // n if n else 0)


def _by_group(x, dim, size, per_group):
    if dim == WHOLE:
        return x * per_group[0]
    return (x.movedim(dim, -1) * per_group.repeat_interleave(size)).movedim(-1, dim)


def _table(count, slots, seed, low=0.05, high=0.6):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, slots, generator=g, dtype=torch.float64)


def _backend(name):
    return _dispatch.backend(name)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_sums_of_every_structure(backend, dtype, centered):
    params, groups = _params(dtype)
    centers = [(p.double() + 0.3).to(dtype) for p in params] if centered else None
    per_tensor, group_sq = _backend(backend).sums(params, centers, groups)
    assert per_tensor.shape == (len(params), 3) and group_sq.shape == (sum(group_sizes(params, groups)),)
    start = 0
    for i, (p, dim, size) in enumerate(zip(params, groups.dims, groups.sizes)):
        d = ref._d(p, None if centers is None else centers[i])
        expected = [d.abs().sum(), d.square().sum(), 0.0]
        if dim != NO_GROUPS:
            sq = _rows(d, dim, size).square().sum(dim=1)
            torch.testing.assert_close(group_sq[start:start + sq.numel()].double(), sq, rtol=ref.sum_rtol(dtype),
                                       atol=1e-30)
            expected[2] = sq.sqrt().sum()
            start += sq.numel()
        torch.testing.assert_close(per_tensor[i].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=ref.sum_rtol(dtype), atol=1e-30)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_grads_with_a_row_of_coefficients_per_tensor(backend, dtype):
    params, groups = _params(dtype)
    table = _table(len(params), len(Gradient), seed=1)
    n = sum(group_sizes(params, groups))
    scale = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = _backend(backend).grads(params, None, groups, table.to(acc_dtype(dtype)), scale.to(acc_dtype(dtype)))
    start = 0
    for i, (p, g, dim, size) in enumerate(zip(params, out, groups.dims, groups.sizes)):
        d = ref._d(p)
        l1, l2 = table[i, Gradient.L1].item(), table[i, Gradient.L2].item()
        expected = l1 * torch.sign(d) + 2 * l2 * d
        if dim != NO_GROUPS:
            k = group_sizes([p], Groups((dim,), (size,)))[0]
            expected = expected + _by_group(d, dim, size, scale[start:start + k])
            start += k
        ref.assert_close_elementwise(g, expected, l1 + (2 * l2 + 1) * d.abs(), dtype, ulps=3)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("given_norms", [False, True], ids=["own-norms", "given-norms"])
def test_add_grad_with_a_row_of_coefficients_per_tensor(backend, dtype, given_norms):
    params, groups = _params(dtype)
    centers = [(p.double() - 0.2).to(dtype) for p in params]
    table = _table(len(params), len(Gradient), seed=2)
    grads = [torch.ones_like(p) for p in params]
    norms = None
    if given_norms:  # e.g. a coupled group's: the update must use them
        n = sum(group_sizes(params, groups))
        norms = torch.rand(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.5
    result = _backend(backend).add_grad_(params, grads, centers, groups, table.to(acc_dtype(dtype)),
                                         None if norms is None else norms.to(acc_dtype(dtype)))
    assert result[0].shape == (len(params), 3)
    start = 0
    for i, (p, g, dim, size) in enumerate(zip(params, grads, groups.dims, groups.sizes)):
        d = ref._d(p, centers[i])
        l1, l2, group = (table[i, s].item() for s in (Gradient.L1, Gradient.L2, Gradient.GROUP))
        expected = 1 + l1 * torch.sign(d) + 2 * l2 * d
        if dim != NO_GROUPS:
            own = _rows(d, dim, size).square().sum(dim=1).sqrt()
            n = norms[start:start + own.numel()] if norms is not None else own
            start += own.numel()
            expected = expected + _by_group(d, dim, size, torch.where(n > 0, group / torch.where(n > 0, n, 1), 0))
        bound = 2 + l1 + (2 * l2 + 2 * group) * d.abs() + group
        ref.assert_close_elementwise(g, expected, bound, dtype, ulps=4)


def prox_reference(w, c, dim, size, row):
    """The proximal step of one tensor with one Prox row, in float64 (the formula of
    ``_terms.prox_group_factor``, written out here; tests/test_prox_exact.py checks it against
    a numerical solve)."""
    t1, den, t3, lo, hi, nonneg = (row[s].item() for s in Prox)
    d = ref._d(w, c)
    if nonneg:
        s = (d - t1).clamp(min=0)
    else:
        s = torch.sign(d) * (d.abs() - t1).clamp(min=0)
    if dim == NO_GROUPS:
        x = s / den
    else:
        norms = _rows(s, dim, size).square().sum(dim=1).sqrt()
        r = ((norms - t3) / den).clamp(min=lo, max=hi)
        x = _by_group(s, dim, size, torch.where(norms > 0, r / torch.where(norms > 0, norms, 1), 0))
    return x if c is None else x + c.double()


def _prox_table(count, seed):
    """Per tensor: its own thresholds, and in turn no constraint, max_norm, min_max_norm,
    unit norm, nonneg (with l1), max_norm with nonneg."""
    table = torch.zeros(count, len(Prox), dtype=torch.float64)
    base = _table(count, 3, seed)
    table[:, Prox.THRESHOLD] = base[:, 0] * 0.5
    table[:, Prox.DENOMINATOR] = 1 + base[:, 1]
    table[:, Prox.GROUP_THRESHOLD] = base[:, 2] * 4
    table[:, Prox.MAX_NORM] = math.inf
    for i in range(count):
        kind = i % 6
        if kind == 1:
            table[i, Prox.MAX_NORM] = 0.8
        elif kind in (2, 3):  # a lower bound: no L1, no nonneg (the plan refuses those)
            table[i, Prox.THRESHOLD] = 0.0
            table[i, Prox.MIN_NORM], table[i, Prox.MAX_NORM] = (0.5, 2.0) if kind == 2 else (1.0, 1.0)
        elif kind == 4:
            table[i, Prox.NONNEG] = 1
        elif kind == 5:
            table[i, Prox.NONNEG] = 1
            table[i, Prox.MAX_NORM] = 1.5
    return table


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_prox_with_a_row_of_terms_and_constraints_per_tensor(backend, dtype, centered):
    params, groups = _params(dtype)
    centers = [(p.double() * 0.5).to(dtype) for p in params] if centered else None
    originals = [p.clone() for p in params]
    for shift in range(2):  # every tensor under two of the constraint kinds
        for p, w in zip(params, originals):
            p.copy_(w)
        table = _prox_table(len(params), seed=shift).roll(shift, dims=0)
        _backend(backend).prox_(params, centers, groups, table.to(acc_dtype(dtype)), None)
        for i, (p, w, dim, size) in enumerate(zip(params, originals, groups.dims, groups.sizes)):
            c = None if centers is None else centers[i]
            expected = prox_reference(w, c, dim, size, table[i])
            scale = ref._d(w, c).abs() + 2 + (0 if c is None else c.double().abs())
            ref.assert_close_elementwise(p, expected, scale, dtype, ulps=6)
            exact = expected == (0 if c is None else c.double())
            assert torch.equal(p.double()[exact], expected[exact]), f"tensor {i}: no exact zeros of d"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sums_of_shrunk_values_with_a_row_per_tensor(backend, dtype):
    # prox_'s norms of the shrunk values, per tensor (thresholds and NONNEG), as a sharded or
    # coupled prox computes them before its update.
    params, groups = _params(dtype)
    table = _prox_table(len(params), seed=5)
    per_tensor, group_sq = _backend(backend).sums(params, None, groups, table.to(acc_dtype(dtype)))
    start = 0
    for i, (p, dim, size) in enumerate(zip(params, groups.dims, groups.sizes)):
        t1, nonneg = table[i, Prox.THRESHOLD].item(), table[i, Prox.NONNEG].item()
        d = ref._d(p)
        s = (d - t1).clamp(min=0) if nonneg else (d.abs() - t1).clamp(min=0)
        torch.testing.assert_close(per_tensor[i, :2].double(), torch.stack([s.sum(), s.square().sum()]),
                                   rtol=2e-6, atol=1e-6)
        if dim != NO_GROUPS:
            sq = _rows(s, dim, size).square().sum(dim=1)
            torch.testing.assert_close(group_sq[start:start + sq.numel()].double(), sq, rtol=2e-6, atol=1e-6)
            start += sq.numel()
