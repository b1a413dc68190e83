"""The C++ `cpu` backend (fastreg/backends/cpu.py + csrc/).

Every check compares against a float64 reference computed here. The general API and contract
suites also run on this backend (they are parametrized over available_backends()); this file
covers what is specific to it: chunking, thread-count invariance, accuracy at scale, layouts,
the registered ops, the JIT build, its cache and its failure modes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastreg.backends import _build, _terms, cpu
from fastreg.backends._geometry import WHOLE, Groups, group_sizes

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Unit roundoff of each dtype (round to nearest): |round(x) - x| <= U * |x| for normal x.
U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# With FMA (the avx2 / avx512 builds) a gradient is rounded once; a generic build may round
# c1*sign(w) + 2*c2*w twice, and g + that three times.
try:
    FMA = cpu.cpu_isa() in ("avx512", "avx2")
except Exception:  # a bad FASTREG_CPU_ISA: the backend reports it as its unavailable reason
    FMA = False
GRAD_ULPS, ADD_ULPS = (1, 2) if FMA else (2, 3)


@pytest.fixture(scope="module")
def ops():
    """The loaded backend; a machine with a C++ compiler must be able to build it."""
    reason = cpu.unavailable_reason()
    if reason is not None:
        if shutil.which(cpu.compiler()) is None:
            pytest.skip(f"no C++ compiler: {reason}")
        pytest.fail(f"the cpu backend failed to build although a compiler exists: {reason}")
    return torch.ops.fastreg_cpu


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# float64 references


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def coeffs(a, b, dtype):
    return torch.tensor([a, b], dtype=acc(dtype))


# The L1/L2 part of the contract, in the two-coefficient form these tests were written in (a
# short vector is every tensor's row); sums are per tensor: (T, 2).
def l1l2_sums(params):
    return cpu.sums(params, None, -1)[0][:, :2]


def l1l2_grads(params, c):
    return cpu.grads(params, None, -1, c, None)


def l1l2_add_grad_(params, targets, c):
    return cpu.add_grad_(params, targets, None, -1, torch.cat([c, c.new_zeros(1)]), None)[0][:, :2]


def l1l2_prox_(params, c):
    return cpu.prox_(params, None, -1, torch.cat([c, c.new_zeros(1)]), None)


def ref_sums(params):
    """Per tensor [Σ|w|, Σw²]: (T, 2)."""
    return torch.tensor([[p.double().abs().sum().item(), p.double().square().sum().item()] for p in params],
                        dtype=torch.float64).reshape(len(params), 2)


def ref_grad(p, c):
    c1, c2 = c.double().tolist()  # the coefficients as the kernel sees them
    w = p.double()
    return c1 * torch.sign(w) + 2 * c2 * w


def ref_prox(p, c):
    t, d = c.double().tolist()
    w = p.double()
    return torch.sign(w) * torch.clamp(w.abs() - t, min=0) / d


def make(sizes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        shape = (s,) if isinstance(s, int) else s
        out.append((torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype))
    return out


def assert_sums(got, params, rtol):
    want = ref_sums(params)
    assert got.shape == (len(params), 2) and got.dtype == acc(params[0].dtype)
    err = ((got.double() - want).abs() / want.clamp_min(1e-300)).max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g} (got {got.tolist()}, want {want.tolist()})"


def assert_rounded(got, want, dtype, scale=None, ulps=1.0):
    """``got`` (dtype) is within ``ulps`` roundings of the float64 ``want`` (relative to
    ``scale``, default |want|), plus float32 compute error for reduced dtypes."""
    scale = want.abs() if scale is None else scale
    u = U[dtype] * ulps + (8 * U[torch.float32] if dtype in (torch.float16, torch.bfloat16) else 0)
    if dtype == torch.float64:
        u = 8 * U[dtype]  # the float64 reference itself rounds
    tiny = {torch.float16: 2.0**-24, torch.bfloat16: 1e-38, torch.float32: 1e-44, torch.float64: 0.0}[dtype]
    err = (got.double() - want).abs()
    bad = err > u * scale + tiny
    assert not bool(bad.any()), f"max error {err.max().item():.3g} at {bad.nonzero()[:3].tolist()}"


# ------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sums_accuracy(ops, dtype):
    params = make([(30, 40), 0, 70_001, (3, 5, 7), 1, 200_003], dtype)
    # fp32/fp16/bf16 accumulate in float blocks then double: bound 11 roundings, ~1e-8 typical;
    # the result is then rounded once to float32.
    assert_sums(l1l2_sums(params), params, rtol=1e-6 if dtype != torch.float64 else 1e-13)


def test_sums_accuracy_40m_fp32(ops):
    """One 40M-element fp32 tensor, N(0.5, 1): PyTorch's CPU norms are off by ~5e-3 here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000_000, generator=g).add_(0.5)
    assert_sums(l1l2_sums([x]), [x], rtol=1e-6)


def test_sums_accuracy_gpt2_shapes(ops):
    """GPT-2 small: 148 tensors, 124M elements, fp32 and bf16."""
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                   (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    shapes += [(768,), (768,)]
    g = torch.Generator().manual_seed(0)
    params = [torch.empty(s).uniform_(-0.05, 0.05, generator=g) for s in shapes]
    assert len(params) == 148 and sum(p.numel() for p in params) == 124_439_808
    assert_sums(l1l2_sums(params), params, rtol=1e-6)
    half = [p.to(torch.bfloat16) for p in params]
    del params
    assert_sums(l1l2_sums(half), half, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elementwise_accuracy(ops, dtype):
    params = make([(17, 33), 0, 70_001, (4, 1, 9), 1], dtype)
    params[0][0, :5] = 0  # sign(0) = 0 and prox keeps exact zeros
    c = coeffs(0.3, 0.7, dtype)
    grads = l1l2_grads(params, c)
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert_rounded(g, ref_grad(p, c), dtype, ulps=GRAD_ULPS)

    base = make([(17, 33), 0, 70_001, (4, 1, 9), 1], dtype, seed=1)
    targets = [b.clone() for b in base]
    sums = l1l2_add_grad_(params, targets, c)
    assert torch.equal(sums, l1l2_sums(params))  # the same pass, the same bits
    for p, b, t in zip(params, base, targets):
        term = ref_grad(p, c)
        want = b.double() + term
        assert_rounded(t, want, dtype, scale=b.double().abs() + term.abs(), ulps=ADD_ULPS)

    p_c = coeffs(0.5, 1.25, dtype)
    shrunk = [p.clone() for p in params]
    assert l1l2_prox_(shrunk, p_c) is None
    for p, s in zip(params, shrunk):
        want = ref_prox(p, p_c)
        assert_rounded(s, want, dtype, ulps=2)
        assert torch.equal(s == 0, want == 0)  # exact zeros exactly where expected


def test_special_values(ops):
    w = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -3.0])
    c = coeffs(0.25, 0.5, torch.float32)
    g = l1l2_grads([w], c)[0]
    want = ref_grad(w, c).float()
    assert torch.equal(g.isnan(), want.isnan()) and torch.equal(g[~g.isnan()], want[~want.isnan()])
    x = w.clone()
    l1l2_prox_([x], coeffs(0.5, 2.0, torch.float32))
    assert x[2].isnan()  # NaN weights stay NaN, never silently zeroed
    assert x[3] == float("inf") and x[4] == -float("inf") and x[5] == 0 and x[6] == -1.25
    s = l1l2_sums([torch.tensor([1.0, -2.0]), torch.tensor([float("inf")])])
    assert s[0].tolist() == [3.0, 5.0] and s[1, 0] == float("inf") and s[1, 1] == float("inf")


def test_identity_prox_and_zero_coefficients(ops):
    params = make([1000, (7, 9)], torch.float32)
    same = [p.clone() for p in params]
    l1l2_prox_(same, coeffs(0.0, 1.0, torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(same, params))
    assert all(not g.any() for g in l1l2_grads(params, coeffs(0.0, 0.0, torch.float32)))


# ------------------------------------------------------------------------------------------
# Multi-tensor chunking


CHUNK_CASES = ("edges", "edges-with-empties", "only-empty", "150-tensors", "4000-tensors", "555-and-7777x77")


def _sizes(case):
    chunk = cpu.CHUNK_ELEMS  # read from the loaded extension (the tests using it take `ops`)
    if case == "edges":
        return [0, 1, chunk - 1, chunk, chunk + 1]
    if case == "edges-with-empties":
        return [0, chunk, 0, 1, chunk - 1, 0, chunk + 1, 0, 3, 0]
    if case == "only-empty":
        return [0, 0]
    if case == "150-tensors":  # more than apex's 110 tensors per launch, empties mixed in
        return torch.randint(0, chunk + 2, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    if case == "4000-tensors":
        return torch.randint(0, 40, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    return [555, 7777 * 77]


@pytest.mark.parametrize("case", CHUNK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_chunk_boundaries(ops, case, dtype):
    params = make(_sizes(case), dtype)
    total = sum(p.numel() for p in params)
    sums = l1l2_sums(params)
    if total == 0:
        assert sums.tolist() == [[0.0, 0.0]] * len(params)
    else:
        assert_sums(sums, params, rtol=1e-6)
    c = coeffs(0.1, 0.2, dtype)
    for p, g in zip(params, l1l2_grads(params, c)):
        assert_rounded(g, ref_grad(p, c), dtype, ulps=GRAD_ULPS)
    base = make(_sizes(case), dtype, seed=5)
    targets = [b.clone() for b in base]
    assert torch.equal(l1l2_add_grad_(params, targets, c), sums)
    for p, b, t in zip(params, base, targets):
        term = ref_grad(p, c)
        assert_rounded(t, b.double() + term, dtype, scale=b.double().abs() + term.abs(), ulps=ADD_ULPS)
    shrunk = [p.clone() for p in params]
    l1l2_prox_(shrunk, coeffs(0.3, 1.5, dtype))
    for p, s in zip(params, shrunk):
        assert_rounded(s, ref_prox(p, coeffs(0.3, 1.5, dtype)), dtype, ulps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_invariance(ops, threads, dtype):
    """Bitwise the same results with 1 and 2 threads (fixed chunks, fixed-order partials)."""
    sizes = [0, 300_001, 1, (257, 1031), 0, cpu.CHUNK_ELEMS * 3 + 5] + [777] * 150
    params = make(sizes, dtype)
    grads0 = make(sizes, dtype, seed=9)
    c = coeffs(0.3, 0.7, dtype)
    results = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        targets = [g.clone() for g in grads0]
        shrunk = [p.clone() for p in params]
        sums = l1l2_sums(params)
        grads = l1l2_grads(params, c)
        added = l1l2_add_grad_(params, targets, c)
        l1l2_prox_(shrunk, coeffs(0.5, 1.5, dtype))
        results.append((sums, grads, added, targets, shrunk))
    first = results[0]
    for other in results[1:]:
        assert torch.equal(first[0], other[0]) and torch.equal(first[2], other[2])
        for k in (1, 3, 4):
            assert all(torch.equal(a, b) for a, b in zip(first[k], other[k]))
    assert torch.equal(first[0], first[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_tensor_operands_do_not_depend_on_the_thread_count(ops, threads, dtype):
    """Every tensor its own structure and row of coefficients, prox constraints included: the
    per-tensor sums of flat chunks spanning many tensors (a partial per segment) and of every
    task kind, the updates and the shrunk sums are bitwise the same with 1 and 2 threads."""
    chunk = cpu.CHUNK_ELEMS
    # Flat: 120 small tensors and a long one. Then Rows (columns; a 1-D tensor's blocks of 10),
    # Runs (blocks of 8 rows; strided runs, A > 1), RunPart (rows longer than a chunk), a whole
    # tensor and an empty one with groups.
    sizes = [777] * 120 + [chunk * 2 + 3, (257, 1031), 50, (96, 64), (4, 8, 100), (3, chunk + 7), (40, 30), 0]
    params = make(sizes, dtype)
    groups = Groups((-1,) * 121 + (1, 0, 0, 1, 0, WHOLE, 0), (1,) * 121 + (1, 10, 8, 2, 1, 1, 1))
    count = len(params)
    gradient = torch.rand(count, len(_terms.Gradient), generator=torch.Generator().manual_seed(1))
    prox = _terms.as_table(torch.tensor([0.0, 1.0]), count, _terms.Prox).clone()
    prox[:, :3] = torch.rand(count, 3, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.5, 1.0, 2.0])
    prox[:, _terms.Prox.DENOMINATOR] += 1
    prox[::3, _terms.Prox.NONNEG] = 1
    prox[1::3, _terms.Prox.MAX_NORM] = 3.0
    results = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        targets = [torch.ones_like(p) for p in params]
        shrunk = [p.clone() for p in params]
        sums = cpu.sums(params, None, groups, prox)
        added = cpu.add_grad_(params, targets, None, groups, gradient.to(acc(dtype)), None)
        cpu.prox_(shrunk, None, groups, prox.to(acc(dtype)), None)
        results.append((sums, added, targets, shrunk))
    first = results[0]
    assert first[0][0].shape == (count, 3)
    for other in results[1:]:
        for k in (0, 1):
            assert torch.equal(first[k][0], other[k][0]) and torch.equal(first[k][1], other[k][1])
        for k in (2, 3):
            assert all(torch.equal(a, b) for a, b in zip(first[k], other[k]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_metric_step_does_not_depend_on_the_thread_count(ops, threads, dtype):
    """metric_prox_: flat tensors cut into chunks, groups of every geometry (rows, columns,
    blocks, whole), an fp32 metric for bf16 params: bitwise the same with 1 and 2 threads."""
    chunk = cpu.CHUNK_ELEMS
    params = make([777] * 40 + [chunk * 2 + 3, (257, 1031), (96, 64), (4, 8, 100), (3, chunk + 7)], dtype)
    groups = Groups((-1,) * 41 + (1, 0, 1, WHOLE), (1,) * 41 + (1, 8, 2, 1))
    count = len(params)
    prox = _terms.as_table(torch.tensor([0.0, 1.0]), count, _terms.Prox).clone()
    prox[:, :3] = torch.rand(count, 3, generator=torch.Generator().manual_seed(2)) * torch.tensor([0.01, 0.5, 0.5])
    prox[:, _terms.Prox.DENOMINATOR] += 1
    prox[::3, _terms.Prox.NONNEG] = 1
    prox[1::3, _terms.Prox.MAX_NORM] = 3.0
    g = torch.Generator().manual_seed(3)
    metric = [_terms.Metric(torch.rand(p.shape, generator=g) * 1e-2, 1.5, 1e-3) for p in params]
    operand = _terms.MetricOperand.of(metric, params, torch.float32)
    results = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        stepped = [p.clone() for p in params]
        cpu.prox_(stepped, None, groups, prox, None, metric=operand)
        results.append(stepped)
    assert any(bool((s == 0).any()) for s in results[0]), "the step must make exact zeros"
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_repeatable(ops):
    params = make([123_457, 5, (300, 301)], torch.float32)
    assert torch.equal(l1l2_sums(params), l1l2_sums(params))


# ------------------------------------------------------------------------------------------
# Layouts: non-contiguous params and grads; in-place ops must write into the user's tensors.


def _layouts(dtype):
    g = torch.Generator().manual_seed(7)
    base_t = torch.randn(40, 30, generator=g).to(dtype)
    base_s = torch.randn(50, 64, generator=g).to(dtype)
    base_c = torch.randn(2, 3, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return {
        "transposed": (base_t, lambda b: b.t()),  # dense, not contiguous
        "sliced-step": (base_s, lambda b: b[:, ::2]),  # not dense
        "sliced-block": (base_s, lambda b: b[3:40, 5:61]),  # not dense
        "channels-last": (base_c, lambda b: b),  # dense, not contiguous
        "contiguous": (base_t, lambda b: b),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced-step", "sliced-block", "channels-last"])
def test_noncontiguous_params(ops, layout, dtype):
    base, view_of = _layouts(dtype)[layout]
    base = base.clone()
    w = view_of(base)
    plain = make([(9, 11)], dtype, seed=4)[0]
    params = [w, plain]
    assert_sums(l1l2_sums(params), params, rtol=1e-6)

    c = coeffs(0.2, 0.4, dtype)
    grads = l1l2_grads(params, c)
    for p, g in zip(params, grads):
        assert g.stride() == torch.empty_like(p).stride()  # the layout the fake impl promises
        assert_rounded(g, ref_grad(p, c), dtype, ulps=GRAD_ULPS)

    # prox_ in place: the view (hence the base) changes, elements outside it do not.
    before = base.clone()
    marker = torch.zeros_like(base, dtype=torch.bool)
    view_of(marker).fill_(True)
    expected = ref_prox(w, coeffs(0.3, 1.5, dtype))
    l1l2_prox_(params, coeffs(0.3, 1.5, dtype))
    assert_rounded(w, expected, dtype, ulps=2)
    assert torch.equal(base[~marker], before[~marker])
    assert view_of(base).data_ptr() == w.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("param_layout", ["contiguous", "transposed", "sliced-step"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "transposed", "sliced-step", "sliced-block"])
def test_noncontiguous_grads(ops, param_layout, grad_layout, dtype):
    layouts = _layouts(dtype)
    pbase, pview = layouts[param_layout]
    w = pview(pbase.clone())
    # a gradient of w's shape in the requested layout, as a view of a larger base
    gb, gview = layouts[grad_layout]
    shape = tuple(w.shape)
    if grad_layout == "transposed":
        gbase = torch.randn(shape[::-1]).to(dtype)
        g = gbase.t()
    elif grad_layout == "contiguous":
        gbase = torch.randn(shape).to(dtype)
        g = gbase
    elif grad_layout == "sliced-step":
        gbase = torch.randn(shape[0], 2 * shape[1]).to(dtype)
        g = gbase[:, ::2]
    else:
        gbase = torch.randn(shape[0] + 3, shape[1] + 4).to(dtype)
        g = gbase[2:2 + shape[0], 1:1 + shape[1]]
    assert g.shape == w.shape
    before_base = gbase.clone()
    before = g.clone()
    marker = torch.zeros_like(gbase, dtype=torch.bool)
    if grad_layout == "transposed":
        marker.t().fill_(True)
    elif grad_layout == "contiguous":
        marker.fill_(True)
    elif grad_layout == "sliced-step":
        marker[:, ::2] = True
    else:
        marker[2:2 + shape[0], 1:1 + shape[1]] = True

    c = coeffs(0.2, 0.4, dtype)
    sums = l1l2_add_grad_([w], [g], c)
    assert torch.equal(sums, l1l2_sums([w]))
    term = ref_grad(w, c)
    assert_rounded(g, before.double() + term, dtype, scale=before.double().abs() + term.abs(), ulps=ADD_ULPS)
    assert torch.equal(gbase[~marker], before_base[~marker])  # nothing written outside g


# ------------------------------------------------------------------------------------------
# The registered ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["sums", "grads", "add_grad_", "prox_", "metric_prox_"])
def test_opcheck(ops, op, dtype):
    params = make([(3, 4), 0, 70_000, 5], dtype)
    params[0] = params[0].t()  # a non-contiguous one too
    params[2] = params[2].reshape(70, 1000)  # a tensor with groups
    count = len(params)
    gradient = torch.tensor([[0.1, 0.2, 0.3]] * count, dtype=acc(dtype))
    gradient[1:, _terms.Gradient.L1] = 0.05  # a row per tensor
    prox = _terms.as_table(torch.tensor([0.1, 1.2, 0.3], dtype=acc(dtype)), count, _terms.Prox).clone()
    prox[2, _terms.Prox.MAX_NORM] = 1.5
    prox[3, _terms.Prox.NONNEG] = 1
    shrink = prox.clone()
    shrink[:, _terms.Prox.THRESHOLD] = 0.25
    # One group_dim for every tensor, and a structure per tensor (blocks of columns, the whole
    # tensor, blocks of 10 rows, one group of a 1-D tensor's 5 elements).
    structures = [Groups.uniform(params, d) for d in (-1, 0, 1)] + [Groups((1, WHOLE, 0, 0), (1, 1, 10, 5))]
    # metric_prox_: √(v·scale) + eps, RMSprop's centered form, v as given (ROOT 0), none
    # (columns: _terms.MetricSlot; centered given for params[1] only)
    metric_table = torch.tensor([[2.0, 1e-3, 1, 0, 0], [1.0, 1e-3, 1, 0, 1], [1.0, 1e-3, 0, 0, 0], [1.0, 0, 1, 1, 0]],
                                dtype=acc(dtype))
    for centers in ([], [p.clone() for p in params]):
        for groups in structures:
            dims, sizes = list(groups.dims), list(groups.sizes)
            n = sum(group_sizes(params, groups))
            vector = torch.rand(n, dtype=acc(dtype)) + 0.5
            args = {
                "sums": (params, centers, dims, sizes, shrink),
                "grads": (params, centers, dims, sizes, gradient, vector if n else None),
                "add_grad_": (params, [torch.randn_like(p) for p in params], centers, dims, sizes, gradient, None),
                "prox_": (params, centers, dims, sizes, prox, vector if n else None),
                "metric_prox_": (params, centers, [torch.rand_like(p) + 0.5 for p in params],
                                 [None, torch.rand_like(params[1]) * 0.1, None, None], dims, sizes, prox,
                                 metric_table),
            }[op]
            result = torch.library.opcheck(getattr(ops, op).default, args)
            assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_penalty_value(ops, dtype):
    """The value op with its own autograd node (csrc/value_node.cpp): schema, the Autograd kernel's
    registration, the fake kernel. (Not aot_dispatch_dynamic: its backward reads concrete group
    counts; the op is never traced, torch.compile takes fastreg::sums.)"""
    params = [p.requires_grad_() for p in make([(3, 4), 5, 700], dtype)]
    params[2] = params[2].detach().reshape(70, 10).requires_grad_()
    table = torch.tensor([[0.1, 0.2, 0.3]] * len(params), dtype=acc(dtype))
    for centers in ([], [p.detach().clone() for p in params]):
        for dims, sizes in (([-1, -1, -1], [1, 1, 1]), ([1, WHOLE, 0], [1, 1, 10])):
            result = torch.library.opcheck(ops.penalty_value.default,
                                           (params, centers, dims, sizes, table, torch.float64),
                                           test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
            assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("result", [torch.float32, torch.float64], ids=str)
def test_value_is_the_weighted_total_bitwise(ops, dtype, result):
    """fastreg_cpu::value forms the products of the weighted total element by element: the very
    value of _ops.weighted_total (ATen's to, mul, ne, where, sum) on the sums, for tables with
    zero, negative and huge coefficients, contiguous, transposed or one row expanded (the plan's
    tables), float32 or float64, of 1 to 40 tensors."""
    from fastreg import _ops
    g = torch.Generator().manual_seed(3)
    for count in (1, 2, 3, 7, 40):
        params = make([(int(s) % 9 + 1, 3) for s in torch.randint(0, 100, (count,), generator=g)], dtype,
                      seed=count, scale=10.0)
        for table_dtype in (torch.float32, torch.float64):
            table = torch.rand(count, 3, generator=g, dtype=torch.float64).to(table_dtype) * 1e-2
            table[::2, 1] = 0
            table[1::3, 0] = -3e5
            for t in (table, table.t().contiguous().t(), table[1 % count].expand(count, 3)):
                sums, _ = ops.sums.default(params, [], [0] * count, [1] * count, None)
                total, _ = ops.value.default(params, [], [0] * count, [1] * count, t, result)
                assert torch.equal(total, _ops.weighted_total(sums, t, result)), (count, table_dtype)


def test_term_slots_mirror_terms_py(ops):
    """The C++ term slots (csrc/terms.h, via fastreg_cpu::term_layout) are _terms.py's: the load-time
    check passed, and it does catch a disagreement."""
    mirrored = cpu.term_mirror()
    assert set(mirrored) == {(enum, name) for enum, name, _ in _terms.layout()}
    _terms.check_mirror("cpu", mirrored)  # what the load did
    wrong = dict(mirrored)
    wrong[("Prox", "DENOMINATOR")] = _terms.Prox.GROUP_THRESHOLD  # two slots swapped
    wrong[("Prox", "GROUP_THRESHOLD")] = _terms.Prox.DENOMINATOR
    with pytest.raises(RuntimeError, match=r"Prox\.DENOMINATOR = 2 \(expected 1\).*Prox\.GROUP_THRESHOLD = 1"):
        _terms.check_mirror("cpu", wrong)
    missing = {key: value for key, value in mirrored.items() if key != ("Sum", "GROUP_NORM")}
    with pytest.raises(RuntimeError, match=r"Sum\.GROUP_NORM = None"):
        _terms.check_mirror("cpu", missing)


def test_constants_come_from_the_extension(ops):
    constants = cpu.constants()
    assert set(constants) == {"chunk_elems", "run_min", "row_max", "rows_task"}
    assert cpu.CHUNK_ELEMS == constants["chunk_elems"] > 0 and cpu.CHUNK_ELEMS & (cpu.CHUNK_ELEMS - 1) == 0
    with pytest.raises(AttributeError):
        cpu.NOT_A_CONSTANT  # noqa: B018


def test_ops_under_torch_compile(ops):
    params = make([(8, 3), 100], torch.float32)

    @torch.compile(backend="eager", fullgraph=True)
    def value(ps):
        return torch.ops.fastreg_cpu.sums(ps, [], [0, -1], [1, 1], None)  # group_dim 0: the 2-D one

    compiled, eager = value(params), cpu.sums(params, None, 0)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


# ------------------------------------------------------------------------------------------
# Build, cache and failure handling (in subprocesses: the build state is per process)


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.pop("FASTREG_BACKEND", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(code, env, timeout=120):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


BROKEN_CXX = """#!/bin/sh
# Answers version queries like the real compiler, fails every compile with a message.
for a in "$@"; do
  if [ "$a" = "-c" ]; then
    echo "fastreg_cpu.cpp:1:1: error: simulated compiler failure XYZZY" >&2
    exit 1
  fi
done
exec c++ "$@"
"""

SLOW_CXX = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-c" ]; then
    sleep 120
    exit 1
  fi
done
exec c++ "$@"
"""


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


needs_posix_cxx = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("c++") is None, reason="needs a POSIX shell and c++"
)


@needs_posix_cxx
def test_broken_compiler_falls_back_and_reports(tmp_path):
    env = _env(tmp_path, TORCH_EXTENSIONS_DIR=tmp_path / "ext", CXX=_script(tmp_path, "cxx", BROKEN_CXX))
    result = _run("""
        import json, warnings, torch, fastreg
        from fastreg.backends import cpu
        w = torch.tensor([[1.0, -2.0], [0.0, 3.0]], requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = fastreg.penalty([w], l1=0.5, l2=0.25)
            b = fastreg.penalty([w], l1=0.5, l2=0.25)
            a.backward()
        try:
            fastreg.penalty([w], l2=1.0, backend="cpu")
            error = None
        except RuntimeError as exc:
            error = str(exc)
        print(json.dumps({
            "values": [a.item(), b.item()], "grad": w.grad.tolist(),
            "warnings": [str(x.message) for x in caught if issubclass(x.category, RuntimeWarning)],
            "error": error, "reason": cpu.unavailable_reason(),
        }))
    """, env)
    want = 0.5 * 6.0 + 0.25 * 14.0  # l1 * Σ|w| + l2 * Σw², by hand
    assert result["values"] == [pytest.approx(want)] * 2
    assert result["grad"] == [[0.5 + 0.5, -0.5 - 1.0], [0.0, 0.5 + 1.5]]
    cpu_warnings = [m for m in result["warnings"] if "'cpu'" in m]
    assert len(cpu_warnings) == 1, result["warnings"]  # warned once, then the torch backend
    assert "XYZZY" in cpu_warnings[0] and "torch" in cpu_warnings[0]
    assert result["error"] is not None and "XYZZY" in result["error"]  # the compiler's message
    assert "XYZZY" in result["reason"]


@needs_posix_cxx
def test_a_first_build_says_so_once_on_stderr(tmp_path):
    # A minute of silence on first use would look like a hang: the build announces itself on
    # stderr (not as a warning), once per process, even when it then fails.
    env = _env(tmp_path, TORCH_EXTENSIONS_DIR=tmp_path / "ext", CXX=_script(tmp_path, "cxx", BROKEN_CXX))
    code = "import torch, fastreg; w = torch.ones(3); fastreg.penalty([w], l2=1.0); fastreg.penalty([w], l2=1.0)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("fastreg: building the C++ CPU kernels (first use on this machine") == 1, out.stderr
    assert str(tmp_path / "ext") in out.stderr and out.stdout == ""


@needs_posix_cxx
def test_missing_compiler_is_a_reason_not_a_crash(tmp_path):
    env = _env(tmp_path, TORCH_EXTENSIONS_DIR=tmp_path / "ext", CXX=tmp_path / "no-such-compiler")
    result = _run("""
        import json
        from fastreg import _dispatch
        print(json.dumps({"reason": _dispatch.unavailable_reason("cpu"),
                          "available": _dispatch.available_backends()}))
    """, env)
    assert "no C++ compiler" in result["reason"] and "no-such-compiler" in result["reason"]
    assert "cpu" not in result["available"] and "torch" in result["available"]


@needs_posix_cxx
def test_killed_build_does_not_block_the_next(tmp_path):
    """A build killed mid-way leaves torch's `lock` file; the next process must not wait on it."""
    ext = tmp_path / "ext"
    code = "from fastreg.backends import cpu; print(cpu.unavailable_reason())"
    slow = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO), start_new_session=True,
                            env=_env(tmp_path, TORCH_EXTENSIONS_DIR=ext, CXX=_script(tmp_path, "slow", SLOW_CXX)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(ext.glob("*/lock")):  # the compile is running
            assert slow.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.1)
    finally:
        os.killpg(slow.pid, signal.SIGKILL)  # python, ninja and the compiler: like a kill -9 / OOM
        slow.wait()
    assert list(ext.glob("*/lock"))  # the stale lock is really there
    env = _env(tmp_path, TORCH_EXTENSIONS_DIR=ext, CXX=_script(tmp_path, "cxx", BROKEN_CXX))
    start = time.monotonic()
    result = _run("""
        import json
        from fastreg.backends import cpu
        print(json.dumps({"reason": cpu.unavailable_reason()}))
    """, env, timeout=120)
    assert time.monotonic() - start < 60
    assert "XYZZY" in result["reason"]  # it got as far as compiling again
    assert not list(ext.glob("*/lock"))


@needs_posix_cxx
def test_live_builder_times_out_instead_of_hanging(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    ext = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    build_dir = Path(cpu.build_config()["build_dir"])
    build_dir.mkdir(parents=True)
    with open(build_dir / "fastreg.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another process is building"
        env = _env(tmp_path, TORCH_EXTENSIONS_DIR=ext, FASTREG_BUILD_TIMEOUT=1,
                   CXX=_script(tmp_path, "cxx", BROKEN_CXX))
        result = _run("""
            import json
            from fastreg.backends import cpu
            print(json.dumps({"reason": cpu.unavailable_reason()}))
        """, env, timeout=60)
    assert "timed out" in result["reason"] and "FASTREG_BUILD_TIMEOUT" in result["reason"]


def test_second_process_loads_the_cached_build(ops):
    """The build made for this session is loaded, not rebuilt, by a new process, within 2 s."""
    library = cpu.build_info()["library"]
    result = _run("""
        import json, time
        import torch
        start = time.perf_counter()
        from fastreg.backends import cpu
        reason = cpu.unavailable_reason()
        seconds = time.perf_counter() - start
        info = cpu.build_info()
        value = cpu.sums([torch.tensor([3.0, -4.0])], None, -1)[0].tolist()
        print(json.dumps({"reason": reason, "seconds": seconds, "built_now": info["built_now"],
                          "library": info["library"], "value": value}))
    """, _env(None))
    assert result["reason"] is None and result["built_now"] is False
    assert result["library"] == library
    assert result["seconds"] < 2.0
    assert result["value"] == [[7.0, 25.0, 0.0]]


def test_disagreeing_term_slots_make_the_backend_unavailable(ops):
    """A build whose slots disagree with _terms.py is not used: the check runs when the library loads."""
    code = """
        import json
        from fastreg.backends import _terms, cpu
        real = _terms.layout
        _terms.layout = lambda: [(e, n, 7 if (e, n) == ("Gradient", "L2") else v) for e, n, v in real()]
        print(json.dumps({"reason": cpu.unavailable_reason(), "loaded": cpu._ops is not None}))
    """
    result = _run(code, _env(None))
    assert result["loaded"] is False
    assert "term slots disagree" in result["reason"] and "Gradient.L2 = 1 (expected 7)" in result["reason"]


def test_build_naming_and_cache_location(ops, monkeypatch, tmp_path):
    config = cpu.build_config()
    assert config["isa"] in config["name"] and config["name"].startswith("fastreg_cpu_")
    assert config["isa"] in ("avx512", "avx2", "neon") or config["isa"].startswith("generic_")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    moved = cpu.build_config()
    assert moved["name"] == config["name"] and moved["build_dir"] == str(tmp_path / config["name"])
    if config["isa"] in ("avx2", "avx512"):  # never a binary this CPU cannot run
        monkeypatch.setenv("FASTREG_CPU_ISA", "neon")
        with pytest.raises(cpu.BuildError, match="not supported by this CPU"):
            cpu.build_config()
    other = "generic" if config["isa"] != "generic_" + _build._machine() else "avx2"
    monkeypatch.setenv("FASTREG_CPU_ISA", other)  # another ISA: another binary, another name
    assert cpu.build_config()["name"] != config["name"]


def test_sources_found_for_checkout_and_package():
    found = cpu.source_dir()
    # Every C++ file is declared, so that every one of them enters the hash that names the build.
    assert sorted(cpu.HEADER_FILES) == sorted(p.name for p in (REPO / "csrc").glob("*.h"))
    assert sorted(cpu.SOURCE_FILES) == sorted(p.name for p in (REPO / "csrc").glob("*.cpp"))
    for name in cpu.SOURCE_FILES + cpu.HEADER_FILES:
        assert (found / name).is_file()
        root = REPO / "csrc" / name
        packaged = REPO / "fastreg" / "csrc" / name  # what package-data ships
        assert root.is_file() and packaged.is_file()
        assert root.read_bytes() == packaged.read_bytes()


def test_cli_info_and_build(ops):
    env = _env(None)
    info = subprocess.run([sys.executable, "-m", "fastreg", "info"], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    for name in ("cpu", "torch", "triton"):
        assert f"\n{name} (" in info.stdout
    assert "cpu (cpu): available" in info.stdout and cpu.build_config()["build_dir"] in info.stdout
    built = subprocess.run([sys.executable, "-m", "fastreg", "build"], env=env, cwd=str(REPO),
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "already built" in built.stdout


# ------------------------------------------------------------------------------------------
# Handles (csrc/operands.cpp)


def test_a_released_handle_is_an_error_not_a_read_of_freed_memory(ops):
    w = torch.ones(3)
    handle = ops.bind_operands([w], [], [-1], [1])
    table = torch.tensor([[0.0, 1.0, 0.0]])
    assert ops.add_to_grad_of(handle, table).item() == 3.0 and torch.equal(w.grad, 2 * w)
    ops.release_operands(handle)
    ops.release_operands(handle)  # (twice: nothing)
    with pytest.raises(RuntimeError, match="no operands with handle"):
        ops.add_to_grad_of(handle, table)
    with pytest.raises(RuntimeError, match="no operands with handle"):
        ops.penalty_value_of(handle, table, torch.float32)
    watch = ops.watch_layout([w], [w])
    assert not ops.layout_changed(watch)
    w.data = torch.ones(4)
    assert ops.layout_changed(watch)
    ops.release_layout(watch)
    with pytest.raises(RuntimeError, match="no layout with handle"):
        ops.layout_changed(watch)
