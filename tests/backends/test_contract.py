"""The backend contract (fastreg/backends/__init__.py), checked on every available backend.

Every term runs through the same four kernels, so every test crosses the operands: no
center / a center; no groups / groups along dim 0 / dim 1 (contiguous, strided, transposed,
long and short runs); each parameter dtype; and for ``add_grad_`` each gradient dtype.
"""

import pytest
import torch

import reference as ref
from fastreg import _dispatch
from fastreg.backends._geometry import NO_GROUPS, acc_dtype, group_sizes

L1, L2, GROUP = 0.3, 0.7, 0.45

# Sizes that put groups in every kind of task of the fused backends; the Triton interpreter
# suite (tests/triton_interpret) runs this file with smaller ones (its tiles are shrunk too).
LONG = 70000  # longer than a 65536-element chunk
MANY = 4000  # tensors in one call
WIDE = 300  # a row wider than a tile
TALL = 70000  # rows of a strided-group tensor
VOCAB, COLUMN = 50257, 4096  # GPT-2's vocabulary (a long row) and a long column

SIZE_CASES = {
    "empty": [0],
    "one": [1],
    "65535": [65535],
    "65537": [65537],
    "chunk-edges-with-empties": [0, 65536, 0, 1, 65535, 0, 65537, 3],
    "555-and-7777x77": [555, 7777 * 77],
    "4000-tensors": None,  # built below: MANY small tensors, some empty
}

# Shapes whose groups land in every kind of task: short and long contiguous runs, runs longer
# than a chunk, strided groups (K = 1, K = 9), rows wider than one window, one group, empty.
def group_shapes():
    return [(256, 64), (3, LONG), (TALL, 3), (5, 4, 3, 3), (64, WIDE), (2, LONG // 3), (1, 50), (0, 5),
            (4, 0), (7,), (33, 65), (16, 1), (1,)]


def _sizes(case):
    if case == "4000-tensors":
        generator = torch.Generator().manual_seed(1)
        return torch.randint(0, 40, (MANY,), generator=generator).tolist()
    return SIZE_CASES[case]


def _coeffs(dtype, *values):
    return torch.tensor(values, dtype=acc_dtype(dtype))


def _backend(name):
    return _dispatch.backend(name)


def _layouts(dtype, seed=7):
    """Dense and non-dense layouts with groups: transposed, channels-last, strided slices."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return [
        randn(40, 30).t(),                                             # dense, transposed
        randn(6, 5, 3, 3).to(memory_format=torch.channels_last),       # dense, channels-last
        randn(50, 40)[:, ::3],                                         # not dense
        randn(3, LONG)[:, 1:],                                         # large, row-strided
        randn(9, 8, 7).permute(2, 0, 1),                               # dense, 3-D permuted
        randn(5, 12)[1:4],                                             # contiguous, offset
    ]


def _centered(params, seed=11):
    """Centers near the params (d small and of both signs), in the params' dtype."""
    generator = torch.Generator().manual_seed(seed)
    return [(p.double() + 0.5 * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(p.dtype)
            for p in params]


def _assert_sums(result, params, dtype, centers=None, group_dim=NO_GROUPS, threshold=0.0):
    per_tensor, group_sq = result
    acc = acc_dtype(dtype)
    assert per_tensor.shape == (len(params), 3) and per_tensor.dtype == acc
    assert group_sq.dtype == acc and group_sq.shape == (sum(group_sizes(params, group_dim)),)
    centers_ = centers if centers is not None else [None] * len(params)
    gd = group_dim if group_dim >= 0 else None
    if not threshold:  # each tensor's own sums
        for i, (p, c) in enumerate(zip(params, centers_)):
            expected = ref.sums([p], None if c is None else [c], gd)
            torch.testing.assert_close(per_tensor[i].double(), expected, rtol=ref.sum_rtol(dtype), atol=1e-30)
    sums = per_tensor.double().sum(dim=0)
    expected = ref.sums(params, centers, gd, threshold)
    expected_sq = ref.group_sq(params, group_dim, centers, threshold) if group_dim >= 0 else torch.zeros(0)
    rtol = ref.sum_rtol(dtype)
    if not threshold:
        torch.testing.assert_close(sums.double(), expected, rtol=rtol, atol=0)
        torch.testing.assert_close(group_sq.double(), expected_sq.double(), rtol=rtol, atol=0)
        return
    # |d| - threshold cancels: the rounding of d (eps·|d|, relative to d, not to s) is the limit.
    eps = ref.eps(acc)
    centers_ = centers if centers is not None else [None] * len(params)
    d = [ref._d(p, c).abs() for p, c in zip(params, centers_)]
    s = [(x - threshold).clamp(min=0) for x in d]
    slack = torch.tensor([2 * eps * sum(x.sum() for x in d), 4 * eps * sum((a * b).sum() for a, b in zip(s, d)), 0.0],
                         dtype=torch.float64)
    slack[2] = (slack[0] + slack[1]) ** 0.5 * 2
    assert ((sums.double() - expected).abs() <= rtol * expected + slack).all(), (sums, expected)
    group_slack = torch.cat([ref.groups_of(a * b, group_dim).sum(dim=1) * 4 * eps
                             for a, b, p in zip(s, d, params) if ref.has_groups(p, group_dim)] or [torch.zeros(0)])
    error = (group_sq.double() - expected_sq).abs()
    assert (error <= rtol * expected_sq + group_slack + 1e-300).all(), error.max()


# ------------------------------------------------------------------------------- sums

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_sums(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype)
    _assert_sums(_backend(backend).sums(params, None, NO_GROUPS), params, dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_sums_with_groups(backend, group_dim, centered, dtype):
    params = ref.make_tensors(group_shapes(), dtype) + _layouts(dtype)
    centers = _centered(params) if centered else None
    _assert_sums(_backend(backend).sums(params, centers, group_dim), params, dtype, centers, group_dim)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1])
def test_sums_of_shrunk_values(backend, group_dim, dtype):
    params = ref.make_tensors(group_shapes()[:6], dtype)
    centers = _centered(params)
    result = _backend(backend).sums(params, centers, group_dim, shrink=0.4)
    _assert_sums(result, params, dtype, centers, group_dim, threshold=0.4)


def test_group_norms_of_long_rows_and_columns_are_exact_to_1e_6(backend):
    # A 50,257-element row (GPT-2's vocabulary) and 4,096-long columns, in fp32.
    params = ref.make_tensors([(3, VOCAB), (COLUMN, 5)], torch.float32)
    for group_dim in (0, 1):
        _, group_sq = _backend(backend).sums(params, None, group_dim)
        expected = ref.group_sq(params, group_dim)
        assert ((group_sq.double().sqrt() - expected.sqrt()).abs() / expected.sqrt()).max() < 1e-6


# ------------------------------------------------------------------------------ grads

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_grads(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype)
    grads = _backend(backend).grads(params, None, NO_GROUPS, _coeffs(dtype, L1, L2), None)
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        ref.assert_close_elementwise(g, ref.grad(p, L1, L2), L1 + 2 * L2 * p.double().abs(), dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_grads_with_groups_and_centers(backend, group_dim, centered, dtype):
    params = ref.make_tensors(group_shapes(), dtype) + _layouts(dtype)
    centers = _centered(params) if centered else None
    n = sum(group_sizes(params, group_dim))
    scale = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(
        acc_dtype(dtype))
    grads = _backend(backend).grads(params, centers, group_dim, _coeffs(dtype, L1, L2), scale)
    start = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        c = None if centers is None else centers[i]
        k = group_sizes([p], group_dim)[0]
        s = scale[start:start + k] if p.ndim >= 2 else None
        start += k
        d = ref._d(p, c).abs()
        bound = L1 + (2 * L2 + (s.double().max().item() if s is not None and k else 0)) * d
        ref.assert_close_elementwise(g, ref.grad(p, L1, L2, group_dim=group_dim, c=c, scale=s), bound, dtype,
                                     ulps=3)


# -------------------------------------------------------------------------- add_grad_

def _check_add_grad(params, grads, before, result, dtype, centers=None, group_dim=NO_GROUPS, group=0.0):
    _assert_sums(result, params, dtype, centers, group_dim)
    acc_eps = ref.eps(acc_dtype(dtype))
    for i, (p, g, g0) in enumerate(zip(params, grads, before)):
        c = None if centers is None else centers[i]
        gd = group_dim if group_dim >= 0 else None
        expected = g0 + ref.grad(p, L1, L2, group if gd is not None else 0.0, group_dim=gd, c=c)
        d = ref._d(p, c).abs()
        grad_scale = L1 + 2 * L2 * d + (group if gd is not None else 0)
        # The gradient is formed in the weight's acc dtype; the sum rounded once to g's dtype.
        error = (g.double() - expected).abs()
        bound = ref.eps(g.dtype) * expected.abs() + 4 * acc_eps * grad_scale + torch.finfo(g.dtype).tiny
        if dtype in (torch.float16, torch.bfloat16):  # the weight's own precision bounds d
            bound = bound + ref.eps(g.dtype) * grad_scale
        assert (error <= bound).all(), f"tensor {i}: max error {error.max().item():.3e}"


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_add_grad_(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype, seed=0)
    grads = ref.make_tensors(_sizes(case), dtype, seed=1)
    before = [g.to(torch.float64, copy=True) for g in grads]
    storages = [g.data_ptr() for g in grads]
    result = _backend(backend).add_grad_(params, grads, None, NO_GROUPS, _coeffs(dtype, L1, L2, 0.0), None)
    assert [g.data_ptr() for g in grads] == storages
    _check_add_grad(params, grads, before, result, dtype)


@pytest.mark.parametrize("grad_dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_add_grad_with_a_gradient_of_another_dtype(backend, dtype, grad_dtype):
    # Read w in its dtype and g in its own; e.g. bf16 weights with fp32 gradients.
    params = ref.make_tensors([LONG + 1, (33, 65), 0, 5], dtype, seed=0)
    grads = ref.make_tensors([LONG + 1, (33, 65), 0, 5], grad_dtype, seed=1)
    grads[1] = grads[1].t().contiguous().t()  # and another layout than its parameter
    before = [g.to(torch.float64, copy=True) for g in grads]
    result = _backend(backend).add_grad_(params, grads, None, 0, _coeffs(dtype, L1, L2, GROUP), None)
    assert all(g.dtype == grad_dtype for g in grads)
    _check_add_grad(params, grads, before, result, dtype, group_dim=0, group=GROUP)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_add_grad_with_groups_and_centers(backend, group_dim, centered, dtype):
    params = ref.make_tensors(group_shapes(), dtype) + _layouts(dtype)
    centers = _centered(params) if centered else None
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(dtype)
             for i, p in enumerate(params)]
    before = [g.to(torch.float64, copy=True) for g in grads]
    result = _backend(backend).add_grad_(params, grads, centers, group_dim, _coeffs(dtype, L1, L2, GROUP), None)
    _check_add_grad(params, grads, before, result, dtype, centers, group_dim, GROUP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_add_grad_with_given_group_norms(backend, dtype):
    # Sharded parameters pass their global norms: the update must use them, not its own.
    params = ref.make_tensors([(20, 30), (64, WIDE), 7], dtype)
    norms = torch.rand(30 + WIDE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    grads = [torch.zeros_like(p) for p in params]
    _backend(backend).add_grad_(params, grads, None, 1, _coeffs(dtype, 0.0, 0.0, GROUP),
                                norms.to(acc_dtype(dtype)))
    expected_scale = GROUP / norms
    for p, g, s in ((params[0], grads[0], expected_scale[:30]), (params[1], grads[1], expected_scale[30:])):
        torch.testing.assert_close(g.double(), p.double() * s, rtol=4 * ref.eps(dtype), atol=0)
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1])
def test_add_grad_without_sums_updates_the_same_and_returns_none(backend, group_dim):
    # want_sums=False (the sharded update after its global norms): the same gradient, bitwise,
    # and no sums; with given norms the tensors with groups are not read again for sums.
    params = ref.make_tensors([(20, 30), (64, WIDE), 7, 0], torch.float32)
    centers = _centered(params)
    sizes = sum(group_sizes(params, group_dim))
    norms = (torch.rand(sizes, generator=torch.Generator().manual_seed(5)) + 0.5) if group_dim >= 0 else None
    coeffs = _coeffs(torch.float32, L1, L2, GROUP)
    with_sums = [torch.ones_like(p) for p in params]
    without = [torch.ones_like(p) for p in params]
    assert _backend(backend).add_grad_(params, with_sums, centers, group_dim, coeffs, norms) is not None
    assert _backend(backend).add_grad_(params, without, centers, group_dim, coeffs, norms, want_sums=False) is None
    assert all(torch.equal(a, b) for a, b in zip(with_sums, without))


# ------------------------------------------------------------------------------ prox_

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_prox_(backend, case, dtype):
    lr, threshold = 0.5, 0.25  # threshold = lr * l1 with l1 = 0.5; denominator 1 + 2*lr*l2, l2 = 0.3
    params = ref.make_tensors(_sizes(case), dtype)
    originals = [p.clone() for p in params]
    _backend(backend).prox_(params, None, NO_GROUPS, _coeffs(dtype, threshold, 1 + 2 * lr * 0.3, 0.0), None)
    for p, w in zip(params, originals):
        expected = ref.prox(w, lr, l1=0.5, l2=0.3)
        ref.assert_close_elementwise(p, expected, w.double().abs(), dtype)
        magnitude = w.double().abs()
        assert (p[magnitude < threshold * 0.99] == 0).all(), "L1 prox must give exact zeros"
        assert (p[magnitude > threshold * 1.01] != 0).all()


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_prox_with_groups_and_centers(backend, group_dim, centered, dtype):
    lr, l1, l2 = 0.5, 0.2, 0.3
    params = ref.make_tensors(group_shapes(), dtype) + _layouts(dtype)
    centers = _centered(params) if centered else None
    originals = [p.clone() for p in params]
    # A group threshold that zeroes some groups of every tensor and keeps others.
    group = 6.0
    coeffs = _coeffs(dtype, lr * l1, 1 + 2 * lr * l2, lr * group)
    _backend(backend).prox_(params, centers, group_dim, coeffs, None)
    zero_groups = 0
    for i, (p, w) in enumerate(zip(params, originals)):
        c = None if centers is None else centers[i]
        expected = ref.prox(w, lr, l1, l2, group, group_dim, c)
        scale = ref._d(w, c).abs() + (0 if c is None else c.double().abs())
        ref.assert_close_elementwise(p, expected, scale, dtype, ulps=4)
        exact = expected == (0 if c is None else c.double())  # where the prox lands on the center
        assert torch.equal(p.double()[exact], expected[exact]), f"tensor {i}: no exact zeros of d"
        if p.ndim >= 2 and p.numel():
            zero_groups += int((ref.groups_of(ref._d(p, c), group_dim) == 0).all(dim=1).sum())
    assert zero_groups > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_prox_with_given_group_norms(backend, dtype):
    params = ref.make_tensors([(20, 30)], dtype)
    original = params[0].clone()
    norms = torch.full((30,), 2.0, dtype=acc_dtype(dtype))
    norms[:10] = 0.5  # below the group threshold 1.0: those columns become exactly zero
    _backend(backend).prox_(params, None, 1, _coeffs(dtype, 0.0, 1.0, 1.0), norms)
    assert (params[0][:, :10] == 0).all()
    torch.testing.assert_close(params[0][:, 10:].double(), original[:, 10:].double() * 0.5, rtol=2 * ref.eps(dtype),
                               atol=0)


# ------------------------------------------------------------------- layouts, determinism

def _non_contiguous(dtype):
    base = torch.randn(64, 96, dtype=torch.float64)
    return [
        base.to(dtype).t(),                       # dense, transposed
        torch.randn(50, 40, dtype=torch.float64).to(dtype)[:, ::3],  # strided slice
        torch.randn(3, LONG, dtype=torch.float64).to(dtype)[:, 1:],  # large, row-strided
        torch.randn(5, dtype=torch.float64).to(dtype).expand(4, 5)[1:].contiguous().t(),
    ]


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_non_contiguous(backend, dtype):
    impl = _backend(backend)
    params = _non_contiguous(dtype)
    assert not any(p.is_contiguous() for p in params)
    _assert_sums(impl.sums(params, None, NO_GROUPS), params, dtype)

    for p, g in zip(params, impl.grads(params, None, NO_GROUPS, _coeffs(dtype, L1, L2), None)):
        ref.assert_close_elementwise(g, ref.grad(p, L1, L2), L1 + 2 * L2 * p.double().abs(), dtype)

    grads = [torch.randn_like(p.t().contiguous()).t() for p in params]  # grads non-contiguous too
    before = [g.to(torch.float64, copy=True) for g in grads]
    impl.add_grad_(params, grads, None, NO_GROUPS, _coeffs(dtype, L1, L2, 0.0), None)
    for p, g, g0 in zip(params, grads, before):
        scale = g0.abs() + L1 + 2 * L2 * p.double().abs()
        ref.assert_close_elementwise(g, g0 + ref.grad(p, L1, L2), scale, dtype)

    originals = [p.clone() for p in params]
    impl.prox_(params, None, NO_GROUPS, _coeffs(dtype, 0.1, 1.5, 0.0), None)  # lr=1, l1=0.1, l2=0.25
    for p, w in zip(params, originals):
        ref.assert_close_elementwise(p, ref.prox(w, 1.0, l1=0.1, l2=0.25), w.double().abs(), dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_sums_are_deterministic(backend, dtype):
    params = ref.make_tensors([1000] * 50 + [LONG * 4 + 1, (WIDE, TALL // 100), (TALL // 100, WIDE)], dtype)
    for group_dim in (NO_GROUPS, 0, 1):
        first = _backend(backend).sums(params, None, group_dim)
        for _ in range(3):
            again = _backend(backend).sums(params, None, group_dim)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_results_do_not_depend_on_the_thread_count(backend):
    params = ref.make_tensors([(TALL // 35, WIDE), (WIDE, TALL // 35), LONG * 7 + 1, (64, 3, 3, 3)], torch.float32)
    centers = _centered(params)
    grads_of = lambda: [torch.ones_like(p) for p in params]  # noqa: E731
    impl = _backend(backend)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            grads = grads_of()
            row = [impl.sums(params, centers, gd) for gd in (NO_GROUPS, 0, 1)]
            row.append(impl.add_grad_(params, grads, centers, 1, _coeffs(torch.float32, L1, L2, GROUP), None))
            results.append((row, grads))
    finally:
        torch.set_num_threads(threads)
    (first, grads_1), (second, grads_2) = results
    for a, b in zip(first, second):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a, b) for a, b in zip(grads_1, grads_2))
