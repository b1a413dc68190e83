"""The Triton backend's kernels, run by the Triton interpreter on CPU tensors.

Run in its own process (see conftest.py)::

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpret

Chunk and tile sizes are shrunk (``CHUNK=1024``, ``BLOCK=256``) so that chunk, tile and
stage-2 boundaries are crossed with small tensors; every expected value is computed here,
independently, in float64.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg import _dispatch, _ops
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups, as_groups
from fastreg.backends._terms import Metric, MetricOperand
from fastreg.backends._workspace import Workspace

B = _dispatch.backend("triton")
kernels, tables, tuning = B.kernels, B.tables, B.tuning

CHUNK = 1024  # MAX_CHUNK in these tests (conftest.py shrinks every tile)
BLOCK = 256
BLOCK_FP64 = 128
FINISH_BLOCK = 16  # stage 2 then loops once per 16 programs of a tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]

# Tile and chunk boundaries (BLOCK and CHUNK, each ±1), empty tensors in between, a
# tensor spanning several chunks, and DESIGN.md's 555.
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 0, CHUNK - 1, CHUNK, CHUNK + 1,
         3 * CHUNK + BLOCK + 1, 555, 0]


# ----------------------------------------------------------------------------- helpers

def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype):
    return torch.finfo(dtype).eps


def randn(shape, dtype, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def make_params(dtype, sizes=SIZES, seed=0):
    params = [randn((n,), dtype, seed + i) for i, n in enumerate(sizes)]
    for p in params:  # zeros of both signs: sign(0) = 0
        if p.numel() > 3:
            p[1] = 0.0
            p[2] = -0.0
    return params


def noncontiguous_params(dtype, seed=100):
    return [
        randn((70, 33), dtype, seed).t(),  # dense, transposed
        randn((40, 90), dtype, seed + 1)[:, ::3],  # not dense
        randn((2, 3, 5, 7), dtype, seed + 2).to(memory_format=torch.channels_last),  # dense
        randn((1, 1200), dtype, seed + 3)[:, 7:1100],  # contiguous, odd storage offset
        randn((), dtype, seed + 4),  # 0-dim
        # not dense, and empty_like keeps channels_last while .contiguous() does not
        randn((2, 8, 5, 7), dtype, seed + 5).to(memory_format=torch.channels_last)[:, ::2],
        randn((5, 1, 6), dtype, seed + 6).expand(5, 4, 6),  # overlapping (stride 0): last
    ]


def ref_sums(params):
    flat = torch.cat([p.detach().double().reshape(-1) for p in params])
    return torch.stack([flat.abs().sum(), (flat * flat).sum()])


def ref_grad(w, c1, c2):
    x = w.detach().double()
    return c1 * torch.sign(x) + 2 * c2 * x


def ref_prox(w, threshold, denominator):
    x = w.detach().double()
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0) / denominator


def assert_sums(got, params, dtype):
    """``got``: a backend's (sums, group_sq) without groups, or its sums: one row per tensor."""
    sums = got[0] if isinstance(got, tuple) else got
    acc = acc_of(dtype)
    assert sums.shape == (len(params), 3) and sums.dtype == acc
    rtol = 1e-13 if acc == torch.float64 else 2e-6
    expected = torch.stack([ref_sums([p]) for p in params])
    torch.testing.assert_close(sums[:, :2].double(), expected, rtol=rtol, atol=1e-300)
    torch.testing.assert_close(sums[:, :2].double().sum(dim=0), ref_sums(params), rtol=rtol, atol=1e-300)


def assert_within(got, ref, scale, ulps, dtype):
    """|got - ref| <= ulps * eps(dtype) * scale, elementwise (got rounded to dtype)."""
    assert got.dtype == dtype
    err = (got.double() - ref).abs()
    bound = ulps * eps(dtype) * scale
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())} elements off, worst {float((err - bound).max()):.3g}: "
        f"got {got.double()[bad][:5].tolist()}, expected {ref[bad][:5].tolist()}"
    )


def coeffs(dtype, first, second, third=0.0):
    return torch.tensor([first, second, third], dtype=acc_of(dtype))


# The L1/L2 contract calls, without centers or groups (``ws``: the workspace, or None).
def sums(params, ws=None):
    return B.sums(params, None, -1, workspace=ws)


def grads(params, c, ws=None):
    return B.grads(params, None, -1, c[:2], None, workspace=ws)


def add_grad_(params, targets, c, ws=None):
    return B.add_grad_(params, targets, None, -1, c, None, workspace=ws)


def prox_(params, c, ws=None):
    B.prox_(params, None, -1, c, None, workspace=ws)


class CountLaunches:
    """Wraps a kernel: counts ``kernel[grid](...)`` launches and keeps their keyword arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0
        self.kwargs = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


# --------------------------------------------------------------------------- contract

def test_available_under_the_interpreter():
    assert B._INTERPRET
    assert B.NAME == "triton"
    assert "cpu" in B.DEVICE_TYPES
    assert B.unavailable_reason() is None
    assert _dispatch.unavailable_reason("triton") is None
    assert "triton" in fastreg.available_backends()


def test_other_devices_refused():
    meta = [torch.empty(4, device="meta")]
    c = torch.ones(3, device="meta")
    for call in (lambda: B.sums(meta, None, -1), lambda: B.grads(meta, None, -1, c, None),
                 lambda: B.add_grad_(meta, meta, None, -1, c, None), lambda: B.prox_(meta, None, -1, c, None)):
        with pytest.raises(RuntimeError, match="triton backend runs on cpu tensors"):
            call()


def test_importable_without_triton_or_interpreter():
    """Without triton the module still imports and says why it cannot run; without the
    interpreter it wants CUDA."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, torch\n"
        "import fastreg.backends.triton as t\n"
        "assert t.DEVICE_TYPES == ('cuda',), t.DEVICE_TYPES\n"
        "r = t.unavailable_reason()\n"
        "assert (r is None) == torch.cuda.is_available(), r\n"
        "for name in [m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'fastreg'))]:\n"
        "    del sys.modules[name]\n"
        "sys.modules['triton'] = None\n"
        "import fastreg\n"
        "from fastreg import _dispatch\n"
        "r = _dispatch.unavailable_reason('triton')\n"
        "assert r is not None and 'triton' in r, r\n"
        "assert 'triton' not in fastreg.available_backends()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_term_slots_mirror_fastreg_terms(monkeypatch):
    """The kernels' term-slot constexprs agree with fastreg.backends._terms (checked when the
    package loads); a disagreement makes the backend unavailable, and says which slot."""
    from fastreg.backends._terms import layout

    assert B._MIRROR_ERROR is None and B._mirror_error() is None
    prefixes = {"MetricSlot": "METRIC"}  # (the kernels' METRIC_SCALE, ...; the others: SUM_ABS, ...)
    for enum, name, value in layout():
        assert getattr(kernels, f"{prefixes.get(enum, enum.upper())}_{name}").value == value
    l2 = kernels.GRADIENT_L2
    monkeypatch.setattr(kernels, "GRADIENT_L2", kernels.GRADIENT_GROUP)
    reason = B._mirror_error()
    assert reason is not None and "Gradient.L2 = 2 (expected 1)" in reason and "triton" in reason
    monkeypatch.setattr(B, "_MIRROR_ERROR", reason)
    assert B.unavailable_reason() == reason
    assert _dispatch.unavailable_reason("triton") == reason
    # The widths of the coefficient rows the kernels step over are mirrored too.
    monkeypatch.setattr(kernels, "GRADIENT_L2", l2)
    monkeypatch.setattr(kernels, "PROX_SLOTS", kernels.GRADIENT_SLOTS)
    reason = B._mirror_error()
    assert reason is not None and "Prox rows of 3 (expected 6)" in reason


# ------------------------------------------------------------------------------- sums

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sums_values(dtype):
    params = make_params(dtype)
    assert_sums(sums(params), params, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sums_noncontiguous(dtype):
    params = noncontiguous_params(dtype)
    assert_sums(sums(params), params, dtype)


def test_sums_all_empty():
    for dtype in DTYPES:
        got, group_sq = B.sums([torch.empty(0, dtype=dtype), torch.empty(3, 0, dtype=dtype)], None, 1)
        assert got.dtype == acc_of(dtype) and torch.equal(got, torch.zeros(2, 3, dtype=acc_of(dtype)))
        assert torch.equal(group_sq, torch.zeros(0, dtype=acc_of(dtype)))  # 3x0 along dim 1: no groups


def test_sums_deterministic():
    params = make_params(torch.float32, seed=7) + noncontiguous_params(torch.float32)
    first = sums(params)[0]
    for _ in range(3):
        assert torch.equal(sums(params)[0], first)
    again = add_grad_(params, [torch.zeros_like(p) for p in params], coeffs(torch.float32, 0.1, 0.2))[0]
    torch.testing.assert_close(again, first, rtol=1e-6, atol=0)
    assert torch.equal(add_grad_(params, [torch.zeros_like(p) for p in params],
                                 coeffs(torch.float32, 0.1, 0.2))[0], again)


def test_sums_fp32_accuracy():
    # 64 chunks of shifted N(0.5, 1) data: partials and stage 2 must keep ~1e-7.
    x = randn((64 * CHUNK + 3,), torch.float32, 11, scale=1.0) + 0.5
    ref = ref_sums([x])
    got = sums([x])[0][0, :2].double()
    assert ((got - ref).abs() / ref).max() < 5e-7


def test_many_tensors():
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 1200, (300,), generator=gen).tolist()
    sizes = [0 if i % 5 == 0 else n for i, n in enumerate(sizes)]  # empties mixed in
    params = [randn((n,), torch.float32, 1000 + i) for i, n in enumerate(sizes)]
    assert_sums(sums(params), params, torch.float32)
    c = coeffs(torch.float32, 0.25, 0.125)
    for p, g in zip(params, grads(params, c)):
        assert_within(g, ref_grad(p, 0.25, 0.125), ref_grad(p, 0.25, 0.125).abs(), 2, torch.float32)
    w = [p.clone() for p in params]
    prox_(w, coeffs(torch.float32, 1.0, 2.0))
    for p, q in zip(params, w):
        ref = ref_prox(p, 1.0, 2.0)
        assert_within(q, ref, (p.double().abs() + 1.0) / 2.0, 2, torch.float32)


# ------------------------------------------------------------------------------ grads

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grads_values_and_layout(dtype):
    params = make_params(dtype) + noncontiguous_params(dtype)
    c = coeffs(dtype, 0.3, 0.05)
    c1, c2 = c[:2].double().tolist()
    out = grads(params, c)
    assert len(out) == len(params)
    for p, g in zip(params, out):
        like = torch.empty_like(p)
        assert g.shape == p.shape and g.dtype == p.dtype and g.stride() == like.stride()
        assert g.data_ptr() != p.data_ptr() or p.numel() == 0
        ref = ref_grad(p, c1, c2)
        assert_within(g, ref, ref.abs(), 2, dtype)
        assert torch.equal(g[p == 0], torch.zeros_like(g[p == 0]))  # sign(0) = 0


def test_grads_all_empty():
    out = grads([torch.empty(0), torch.empty(2, 0)], coeffs(torch.float32, 1.0, 1.0))
    assert [tuple(g.shape) for g in out] == [(0,), (2, 0)]


# -------------------------------------------------------------------------- add_grad_

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_grad_values(dtype):
    params = make_params(dtype, seed=20)
    old = [randn(p.shape, dtype, 500 + i, scale=0.5) for i, p in enumerate(params)]
    targets = [g.clone() for g in old]
    c = coeffs(dtype, 0.2, 0.4)
    c1, c2 = c[:2].double().tolist()
    got = add_grad_(params, targets, c)
    assert_sums(got, params, dtype)
    for p, g0, g in zip(params, old, targets):
        step = ref_grad(p, c1, c2)
        assert_within(g, g0.double() + step, g0.double().abs() + step.abs(), 2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_grad_layouts(dtype):
    """Every pairing of dense/non-dense/transposed weights and gradients; the gradient
    tensors given (views included) are the ones updated, and nothing around them."""
    base_w = randn((60, 90), dtype, 1)
    base_g = randn((90, 60), dtype, 2, scale=0.5)
    base_g_before = base_g.clone()
    pairs = [
        (randn((30, 40), dtype, 3), randn((40, 30), dtype, 4).t()),  # g transposed
        (randn((40, 30), dtype, 5).t(), randn((30, 40), dtype, 6)),  # w transposed
        (randn((40, 30), dtype, 7).t(), randn((40, 30), dtype, 8).t()),  # both, same order
        (base_w[:, ::3], randn((60, 30), dtype, 9)),  # w not dense
        (randn((30, 30), dtype, 10), base_g[::3, 30:]),  # g not dense: copied back
        (randn((2, 3, 4, 5), dtype, 11),
         randn((2, 3, 4, 5), dtype, 12).to(memory_format=torch.channels_last)),
        (randn((0, 5), dtype, 13), torch.empty((0, 5), dtype=dtype)),
    ]
    params = [w for w, _ in pairs]
    targets = [g for _, g in pairs]
    old = [g.clone() for g in targets]
    c = coeffs(dtype, 0.5, 0.25)
    got = add_grad_(params, targets, c)
    assert_sums(got, params, dtype)
    for w, g0, g in zip(params, old, targets):
        step = ref_grad(w, 0.5, 0.25)
        assert_within(g, g0.double() + step, g0.double().abs() + step.abs(), 2, dtype)
    untouched = torch.ones_like(base_g, dtype=torch.bool)
    untouched[::3, 30:] = False
    assert torch.equal(base_g[untouched], base_g_before[untouched])
    assert torch.equal(base_g[::3, 30:], targets[4])


def test_add_grad_all_empty():
    got, _ = add_grad_([torch.empty(0)], [torch.empty(0)], coeffs(torch.float32, 1.0, 1.0))
    assert torch.equal(got, torch.zeros(1, 3))


def test_add_grad_fp64_gradient_of_an_fp32_weight_is_not_read_as_fp32():
    # The regression of the issue: an fp64 .grad of an fp32 parameter was read as fp32.
    w = torch.randn(10)
    g = torch.zeros(10, dtype=torch.float64)
    B.add_grad_([w], [g], None, -1, coeffs(torch.float32, 0.0, 1.0), None)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, 2 * w.double(), rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------ prox_

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prox_values_and_exact_zeros(dtype):
    params = make_params(dtype, seed=40) + noncontiguous_params(dtype, seed=140)[:-1]
    params[3][:4] = torch.tensor([0.5, -0.5, 0.25, -0.75], dtype=dtype)  # at the threshold
    before = [p.clone() for p in params]
    c = coeffs(dtype, 0.5, 1.25)
    threshold, denominator = c[:2].double().tolist()
    prox_(params, c)
    for x, w in zip(before, params):
        ref = ref_prox(x, threshold, denominator)
        assert_within(w, ref, (x.double().abs() + threshold) / denominator, 2, dtype)
        shrunk = x.to(acc_of(dtype)).abs() <= c[0]
        assert torch.equal(w[shrunk], torch.zeros_like(w[shrunk]))  # exact zeros
        assert (w[~shrunk] != 0).float().mean() > 0.99 if (~shrunk).any() else True


def test_nan_propagates():
    nan = float("nan")
    w = torch.tensor([nan, 1.0, -nan, 0.1, 0.0])
    assert torch.isnan(sums([w])[0][0, :2]).all()
    assert torch.isnan(grads([w], coeffs(torch.float32, 0.5, 0.5))[0][[0, 2]]).all()
    prox_([w], coeffs(torch.float32, 0.5, 2.0))
    assert torch.isnan(w[[0, 2]]).all() and torch.equal(w[[1, 3, 4]], torch.tensor([0.25, 0.0, 0.0]))


def test_prox_noncontiguous_writes_back():
    base = randn((40, 90), torch.float32, 9)
    before = base.clone()
    view = base[:, ::3]
    prox_([view, base[:1, :0]], coeffs(torch.float32, 1.0, 2.0))
    ref = ref_prox(before[:, ::3], 1.0, 2.0)
    assert_within(base[:, ::3], ref, (before[:, ::3].double().abs() + 1.0) / 2.0, 2, torch.float32)
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, ::3] = False
    assert torch.equal(base[mask], before[mask])


# --------------------------------------------------------------------- the public API

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_penalty_autograd(dtype):
    params = [p.requires_grad_() for p in make_params(dtype, seed=60)]
    params.append(randn((50, 40), dtype, 61).t().requires_grad_())  # a transposed leaf
    value = fastreg.penalty(params, l1=0.3, l2=0.05, backend="triton")
    ref = ref_sums(params)
    expected = 0.3 * ref[0] + 0.05 * ref[1]
    assert value.dtype == acc_of(dtype) and value.ndim == 0
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=0)
    value.backward()
    for p in params:
        step = ref_grad(p, 0.3, 0.05)
        assert p.grad.stride() == torch.empty_like(p).stride()
        assert_within(p.grad, step, step.abs(), 4, dtype)


def test_penalty_mixed_dtypes_and_requested_backend():
    params = [randn((CHUNK + 5,), torch.float32, 70).requires_grad_(),
              randn((300,), torch.bfloat16, 71).requires_grad_(),
              randn((0,), torch.float16, 72).requires_grad_()]
    reg = fastreg.Penalty(params, l1=0.1, l2=0.2, backend="triton")
    assert "triton" in reg.explain()
    value = reg()
    s32, s16 = ref_sums(params[:1]), ref_sums(params[1:2])
    expected = 0.1 * (s32[0] + s16[0]) + 0.2 * (s32[1] + s16[1])
    torch.testing.assert_close(value.double(), expected, rtol=2e-6, atol=0)
    value.backward()
    for p in params:
        step = ref_grad(p, 0.1, 0.2)
        assert_within(p.grad, step, step.abs(), 4, p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_penalty_add_to_grad_none_and_existing(dtype):
    params = [randn((CHUNK + 3,), dtype, 80), randn((17, 9), dtype, 81), randn((40,), dtype, 82)]
    params = [torch.nn.Parameter(p) for p in params]
    params[1].grad = randn((9, 17), dtype, 83).t()  # existing, non-contiguous
    old = params[1].grad.clone()
    reg = fastreg.Penalty(params, l1=0.25, l2=0.5, backend="triton")
    value = reg.add_to_grad_()
    ref = ref_sums(params)
    torch.testing.assert_close(value.double(), 0.25 * ref[0] + 0.5 * ref[1], rtol=2e-6, atol=0)
    for i, p in enumerate(params):
        step = ref_grad(p, 0.25, 0.5)
        before = old.double() if i == 1 else torch.zeros_like(step)
        assert_within(p.grad, before + step, before.abs() + step.abs(), 4, dtype)


def test_penalty_prox():
    params = [torch.nn.Parameter(randn((CHUNK + 9,), torch.float32, 90)),
              torch.nn.Parameter(randn((33, 12), torch.float32, 91))]
    before = [p.detach().clone() for p in params]
    reg = fastreg.Penalty(params, l1=2.0, l2=0.5, backend="triton")
    reg.prox_(lr=0.25)
    for x, p in zip(before, params):
        ref = ref_prox(x, 0.5, 1.25)
        assert_within(p.detach(), ref, (x.double().abs() + 0.5) / 1.25, 2, torch.float32)
        assert torch.equal(p.detach()[x.abs() <= 0.5], torch.zeros_like(p.detach()[x.abs() <= 0.5]))


def test_opcheck():
    params = [randn((CHUNK + 1,), torch.float32, 95).requires_grad_(),
              randn((7, 3), torch.float32, 96).requires_grad_()]
    centers = [torch.zeros_like(p) for p in params]
    ws = Workspace()
    # (group_dims, group_sizes): none; columns of the 2-D one; blocks and a whole tensor
    for centers_, dims, sizes, handle in (([], [-1, -1], [1, 1], 0),
                                          (centers, [-1, 1], [1, 1], ws.handle),
                                          (centers, [-2, 0], [1, 7], ws.handle)):
        torch.library.opcheck(torch.ops.fastreg.sums.default, (params, centers_, dims, sizes, "triton", handle))


# ------------------------------------------------------------------ launches and plans

def _count_launches(monkeypatch):
    counters = {name: CountLaunches(getattr(kernels, name)) for name in
                ("_sums_kernel", "_group_sq_kernel", "_finish_kernel", "_elementwise_kernel", "_metric_prox_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(kernels, name, counter)

    def launches():
        counts = {name: c.launches for name, c in counters.items()}
        for c in counters.values():
            c.launches = 0
        return counts

    return counters, launches


def test_launches_per_call(monkeypatch):
    counters, launches = _count_launches(monkeypatch)
    params = make_params(torch.float32, sizes=[5, 0, CHUNK * 2 + 1, 300] * 10)
    c = coeffs(torch.float32, 0.5, 0.5)
    sums(params)
    assert launches() == {"_sums_kernel": 1, "_group_sq_kernel": 0, "_finish_kernel": 1, "_elementwise_kernel": 0,
                          "_metric_prox_kernel": 0}
    grads(params, c)
    assert sum(launches().values()) == 1
    add_grad_(params, [torch.zeros_like(p) for p in params], c)
    assert launches() == {"_sums_kernel": 0, "_group_sq_kernel": 0, "_finish_kernel": 1, "_elementwise_kernel": 1,
                          "_metric_prox_kernel": 0}
    prox_(params, c)
    assert sum(launches().values()) == 1
    # Groups: one stage-1 launch per mode present (runs, rows), one group reduction, one finish.
    grouped = [randn((40, 300), torch.float32, 1), randn((20, 3), torch.float32, 2), randn((7,), torch.float32, 3)]
    B.sums(grouped, None, 0)
    assert launches() == {"_sums_kernel": 3, "_group_sq_kernel": 1, "_finish_kernel": 1, "_elementwise_kernel": 0,
                          "_metric_prox_kernel": 0}
    B.add_grad_(grouped, [torch.zeros_like(p) for p in grouped], None, 0, c, None)
    counts = launches()
    assert counts["_sums_kernel"] == 2 and counts["_elementwise_kernel"] == 3  # norms first, then the update
    # The step in a metric: the flat launch of the tables, and one of a program per group; no norms first.
    metric = MetricOperand.of([Metric(torch.rand(p.shape) + 0.5, root=False) for p in grouped], grouped,
                              torch.float32)
    B.prox_(grouped, None, 0, coeffs(torch.float32, 0.1, 1.1, 0.2), None, metric=metric)
    assert launches() == {"_sums_kernel": 0, "_group_sq_kernel": 0, "_finish_kernel": 0, "_elementwise_kernel": 0,
                          "_metric_prox_kernel": 2}
    assert [kw["MODE"] for kw in counters["_metric_prox_kernel"].kwargs] == [kernels.MODE_FLAT, kernels.MODE_GROUP]


def test_alignment_is_per_tensor(monkeypatch):
    # One tensor at an odd offset no longer turns off the aligned (vectorised) launch for the others.
    counters, launches = _count_launches(monkeypatch)
    aligned = [randn((1000,), torch.float32, i) for i in range(5)]
    odd = randn((1001,), torch.float32, 9)[1:]  # data pointer 4 bytes past 16-byte alignment
    assert odd.data_ptr() % 16 and all(p.data_ptr() % 16 == 0 for p in aligned)
    assert_sums(sums(aligned + [odd]), aligned + [odd], torch.float32)
    flags = [kw["ALIGNED"] for kw in counters["_sums_kernel"].kwargs]
    assert sorted(flags) == [False, True]
    plan = tables._tables(aligned + [odd], None, as_groups(aligned + [odd], -1), None, False)
    by_flag = {launch.aligned: launch.programs for launch in plan.launches}
    assert by_flag[False] == -(-odd.numel() // plan.chunk)
    assert by_flag[True] == sum(-(-p.numel() // plan.chunk) for p in aligned)


def test_fp_fusion_is_set_explicitly_on_every_launch(monkeypatch):
    counters, _ = _count_launches(monkeypatch)
    params = [randn((40, 30), torch.float32, 1)]
    c = coeffs(torch.float32, 0.1, 0.2, 0.3)
    B.sums(params, None, 1)
    B.add_grad_(params, [torch.zeros_like(p) for p in params], None, 1, c, None)
    B.prox_(params, None, 1, c, None)
    grads(params, c)
    kwargs = [kw for counter in counters.values() for kw in counter.kwargs]
    assert kwargs and all(kw.get("enable_fp_fusion") is True for kw in kwargs)


def test_chunk_fills_the_device_and_depends_on_sizes_only(monkeypatch):
    monkeypatch.setattr(tuning, "MAX_CHUNK", 65536)
    monkeypatch.setattr(tuning, "TARGET_PROGRAMS", 1024)
    assert tables._chunk(2_000_000, 2048) == 2048  # 2M parameters: ~1000 programs, not 32
    assert tables._chunk(124_000_000, 2048) == 65536  # GPT-2: the largest chunk, ~1900 programs
    assert tables._chunk(10, 2048) == 2048
    assert all(tables._chunk(n, 2048) >= 2048 and tables._chunk(n, 2048) & (tables._chunk(n, 2048) - 1) == 0
               for n in (1, 3000, 5_000_000, 10**9))


def test_plan_cache_reused_and_keyed():
    ws = Workspace()
    params = make_params(torch.float32, seed=5)
    sums(params, ws)
    assert ws.builds == 1 and len(ws.entries) == 1
    first = sums(params, ws)[0]
    assert ws.builds == 1 and ws.hits == 1
    prox_(params, coeffs(torch.float32, 0.0, 1.0), ws)  # same tensors: same tables (threshold 0, denominator 1: no-op)
    assert ws.builds == 1
    assert torch.equal(sums(params, ws)[0], first)
    targets = [torch.zeros_like(p) for p in params]
    c = coeffs(torch.float32, 0.5, 0.5)
    add_grad_(params, targets, c, ws)
    add_grad_(params, targets, c, ws)
    # The targets' pointer table is built per call, owned by the call: the workspace holds only
    # the tables of the parameters.
    assert ws.builds == 1 and len(ws.entries) == 1 and not ws.captured
    assert all(isinstance(t, tables._Tables) for t in ws.entries.values())

    moved = [p.clone() for p in params]  # new pointers, same sizes
    assert torch.equal(sums(moved, ws)[0], first)
    assert ws.builds == 2
    halves = [p[: (p.numel() + 1) // 2] for p in params]  # same pointers, other sizes
    assert_sums(sums(halves, ws), halves, torch.float32)
    assert ws.builds == 3


def test_plan_cache_keyed_by_structure():
    # The same tensors with another structure (block size, dim, whole) get their own tables.
    ws = Workspace()
    params = [randn((12, 40), torch.float32, 1), randn((30,), torch.float32, 2)]
    structures = [Groups((0, NO_GROUPS), (1, 1)), Groups((0, NO_GROUPS), (3, 1)), Groups((1, 0), (4, 5)),
                  Groups((WHOLE, WHOLE), (1, 1)), Groups((0, NO_GROUPS), (3, 1))]
    for i, groups in enumerate(structures):
        _, group_sq = B.sums(params, None, groups, workspace=ws)
        assert ws.builds == min(i + 1, 4)
        expected = torch.cat([(p.double().movedim(d, 0).reshape(p.shape[d] // k, -1) if d >= 0 else
                               p.double().reshape(1, -1)).square().sum(dim=1)
                              for p, d, k in zip(params, groups.dims, groups.sizes) if d != NO_GROUPS])
        torch.testing.assert_close(group_sq.double(), expected, rtol=2e-6, atol=0)


def test_nothing_cached_without_a_workspace(monkeypatch):
    builds = []
    build = tables._build_tables
    monkeypatch.setattr(tables, "_build_tables", lambda *args: builds.append(1) or build(*args))
    params = make_params(torch.float32, seed=6)
    first = sums(params)[0]
    assert torch.equal(sums(params)[0], first)
    assert len(builds) == 2


def test_plan_cache_bounded():
    ws = Workspace(limit=3)
    keep = [randn((10 + i,), torch.float32, i) for i in range(8)]
    for t in keep:
        sums([t], ws)
    assert len(ws.entries) == 3 and ws.builds == 8
    assert_sums(sums([keep[0]], ws), [keep[0]], torch.float32)  # evicted, rebuilt, right
    assert ws.builds == 9


def test_plans_built_during_graph_capture_stay_out_of_the_shared_cache(monkeypatch):
    # Tables built while a CUDA graph is captured are uploaded only when the graph replays: an
    # eager call must not find them in the cache (it would read uninitialised tables).
    ws = Workspace()
    params = make_params(torch.float32, seed=8)
    monkeypatch.setattr(B, "_capturing", lambda device: True)
    sums(params, ws)
    assert len(ws.entries) == 0 and len(ws.captured) == 1
    monkeypatch.setattr(B, "_capturing", lambda device: False)
    sums(params, ws)
    assert len(ws.entries) == 1 and ws.builds == 2
    assert all(t is not ws.captured[0] for t in ws.entries.values())


def test_plans_are_keyed_by_stream(monkeypatch):
    # Tables uploaded on one stream are not reused from another: their copy is ordered on its own.
    ws = Workspace()
    params = make_params(torch.float32, seed=9)
    monkeypatch.setattr(tables, "_stream_key", lambda device: 1)
    sums(params, ws)
    monkeypatch.setattr(tables, "_stream_key", lambda device: 2)
    sums(params, ws)
    assert ws.builds == 2
    monkeypatch.setattr(tables, "_stream_key", lambda device: 1)
    sums(params, ws)
    assert ws.builds == 2 and ws.hits == 1


def test_launch_configs_cover_what_a_call_launches(monkeypatch):
    # Every launch a call makes has its constexprs among launch_configs() (the compile checks).
    monkeypatch.setattr(tuning, "BLOCK", 2048)  # the real tiles (launch_configs uses the current ones)
    monkeypatch.setattr(tuning, "BLOCK_FP64", 1024)
    monkeypatch.setattr(tuning, "RUN_TILE", 256)
    monkeypatch.setattr(tuning, "MIN_RUN", 64)
    configs = [(kernel.fn.__name__, constexprs) for _, kernel, _, constexprs, _ in B.launch_configs()]
    counters, _ = _count_launches(monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        # every mode and tile: runs (K=100), rows (K=3), flat, one long run (K >= RUN_LONG * BLOCK), unaligned
        params = [randn((60, 100), dtype, 1), randn((20, 3), dtype, 2), randn((9,), dtype, 3),
                  randn((1, 17000), dtype, 4)[:, 1:]]
        B.sums(params, None, 0)
        B.prox_(params, [p.clone() for p in params], 1, coeffs(dtype, 0.1, 1.1, 0.2), None)
        B.add_grad_(params, [torch.zeros_like(p, dtype=torch.float32) for p in params], None, 1,
                    coeffs(dtype, 0.1, 0.2, 0.3), None)
        for v_dtype in (dtype, torch.float32):  # the step in a metric: flat (aligned and not), per group
            metric = [Metric((torch.rand(p.shape) + 0.5).to(v_dtype), root=False) for p in params]
            table = coeffs(dtype, 0.0, 1.0, 0.2)
            _ops.prox_("triton", params, None, Groups((0, NO_GROUPS, NO_GROUPS, NO_GROUPS), (1,) * 4), table,
                       metric=metric)
    assert counters["_metric_prox_kernel"].launches == 12
    for name, counter in counters.items():
        for kw in counter.kwargs:
            launched = {k: v for k, v in kw.items() if k.isupper()}
            assert any(n == counter.kernel.fn.__name__ and all(c.get(k) == v for k, v in launched.items())
                       for n, c in configs), (name, launched)


# ------------------------------------------------------------------- the step in a metric

def _metric_case(dtype, seed):
    """Params whose groups are walked in every way (one run longer than a tile, A runs of K > or
    < a tile with carries, K = 1, one element), a param without groups, and an empty one; a
    metric of every kind, the metric tensors in float32 (of another dtype than bf16 / fp64
    params) and in other memory orders than their params."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def make():  # the same values and layouts at every call
        params = [randn((2 * BLOCK + 37,), dtype, seed), randn((3, 2, BLOCK + 44), dtype, seed + 1),
                  randn((4, 6, 40), dtype, seed + 2), randn((40, 6), dtype, seed + 3), randn((9,), dtype, seed + 4),
                  randn((30, 20), dtype, seed + 5).t(), randn((0, 4), dtype, seed + 6),
                  randn((700,), dtype, seed + 7), randn((12, 50), dtype, seed + 8)[:, ::2]]
        params[1][:, 0] *= 1e-3  # params[1]: a group below its threshold, one above its max norm
        return params

    params = make()
    groups = Groups((WHOLE, 1, 1, 1, 0, 0, 0, NO_GROUPS, 1), (1, 1, 3, 1, 1, 2, 2, 1, 5))
    v_dtype = torch.float32

    def state(p, scale=1e-2):  # an optimizer's state: contiguous, whatever the param's layout
        return (scale * torch.exp(rand(*p.shape) * 2 - 1)).to(v_dtype).contiguous()

    metrics = [Metric(state(p), 1 / (1 - 0.999 ** 3), 1e-3) for p in params]
    metrics[1] = Metric((rand(*params[1].shape) * 4 + 0.2).to(v_dtype), root=False)
    m = (0.05 * rand(*params[2].shape)).to(v_dtype)
    metrics[2] = Metric((state(params[2]).double() + m.double() ** 2).to(v_dtype), 1.0, 1e-3, centered=m)
    metrics[3] = None  # the Euclidean step for this one
    metrics[5] = Metric(state(params[5]).t().contiguous().t(), 1.0, 1e-3)  # dense, another order than the param
    metrics[8] = Metric(state(params[8]).t().contiguous().t(), 1.0, 1e-3)  # the param is not dense
    centers = [(0.1 * randn(p.shape, dtype, seed + 20 + i)) for i, p in enumerate(params)]
    centers[1][:, 0] *= 1e-3  # (the group of params[1] below its threshold stays below it)
    rows = torch.tensor([[0.01, 1.2, 0.3, 0.0, float("inf"), 0.0], [0.0, 1.0, 2.0, 0.0, 1.5, 0.0],
                         [0.02, 1.0, 0.05, 0.0, 0.5, 1.0], [0.0, 1.4, 0.0, 0.0, 1.0, 0.0],
                         [0.01, 1.0, 0.1, 0.0, float("inf"), 0.0], [0.0, 1.1, 0.4, 0.0, 3.0, 0.0],
                         [0.0, 1.0, 0.1, 0.0, float("inf"), 0.0], [0.05, 1.2, 0.0, 0.0, float("inf"), 1.0],
                         [0.01, 1.0, 0.2, 0.0, float("inf"), 0.0]], dtype=acc_of(dtype))
    return make, centers, groups, metrics, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("with_centers", [False, True], ids=["plain", "centered"])
def test_the_metric_step_walks_every_group_geometry(dtype, with_centers, monkeypatch):
    """Against the torch backend's reference step; the Triton kernel is what runs (the torch
    backend's step is not called), the metric tensors are read where they are (copied only when in
    another memory order than their param), and the groups that vanish are exactly zero."""
    assert B.METRIC_PROX
    make, centers, groups, metrics, rows = _metric_case(dtype, 7)
    centers = centers if with_centers else None
    expected = make()
    _ops.prox_("torch", expected, centers, groups, rows, metric=metrics)
    torch_prox = _dispatch.backend("torch").prox_
    monkeypatch.setattr(_dispatch.backend("torch"), "prox_", lambda *a, **k: pytest.fail("the torch step ran"))
    got = make()
    _ops.prox_("triton", got, centers, groups, rows, metric=metrics)
    monkeypatch.setattr(_dispatch.backend("torch"), "prox_", torch_prox)
    rtol, atol = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-2, 1e-2), torch.float64: (1e-10, 1e-12)}[dtype]
    for i, (x, y) in enumerate(zip(got, expected)):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=lambda m, i=i: f"[{i}] {m}")
        if centers is None or dtype != torch.bfloat16:  # (c + a small x may round to c in bf16, either way)
            c = 0 if centers is None else centers[i]
            assert torch.equal(x == c, y == c), f"[{i}]: the exact zeros of the step must be exact"
    # Groups that vanish, groups pulled to their max norm, and neither: each kind is tested.
    d = [(x.double() - (0 if centers is None else centers[i].double())) for i, x in enumerate(got)]
    assert any(float(row.norm()) == 0 for row in d[1].movedim(1, 0).reshape(2, -1))
    assert any(float(row.norm()) == pytest.approx(1.5, rel=1e-2) for row in d[1].movedim(1, 0).reshape(2, -1))


def test_the_metric_step_reuses_the_cached_tables():
    ws = Workspace()
    params = [randn((40, 30), torch.float32, 1), randn((500,), torch.float32, 2)]
    metrics = [Metric(torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) + 0.5, root=False)
               for i, p in enumerate(params)]
    rows = torch.tensor([0.01, 1.1, 0.2])
    expected = [p.clone() for p in params]
    for _ in range(2):
        _ops.prox_("torch", expected, None, 1, rows, metric=metrics)
        _ops.prox_("triton", params, None, 1, rows, metric=metrics, workspace=ws)
    assert ws.builds == 1 and ws.hits == 1
    for x, y in zip(params, expected):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


def test_the_metric_of_a_tensor_without_one_is_never_read():
    """IDENTITY rows: D = 1 whatever their v holds (the kernels mask its loads), and a metric tensor
    of another dtype than the param (the call's metric dtype) is fine beside them."""
    w = randn((50, 30), torch.bfloat16, 1)
    other = randn((40,), torch.bfloat16, 2)
    rows = torch.tensor([[0.01, 1.1, 0.3, 0.0, float("inf"), 0.0]] * 2)
    v = torch.full((40,), 0.25)  # float32 state for a bf16 param
    euclidean = w.clone()
    B.prox_([euclidean], None, 0, rows[:1], None)  # the Euclidean step (group factor, in the elementwise kernel)
    operand = MetricOperand([torch.full((50, 30), float("nan")), v], [None, None],
                            torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]))
    got, got_other = w.clone(), other.clone()
    B.prox_([got, got_other], None, Groups((0, NO_GROUPS), (1, 1)), rows, None, metric=operand)
    torch.testing.assert_close(got.double(), euclidean.double(), rtol=1e-2, atol=1e-2)
    assert torch.equal(got == 0, euclidean == 0)
    expected = torch.sign(other.double()) * torch.clamp(0.25 * other.double().abs() - 0.01, min=0) / (0.25 + 0.1)
    torch.testing.assert_close(got_other.double(), expected, rtol=1e-2, atol=1e-3)


def test_the_metric_step_of_a_group_is_exact_at_its_bounds():
    """A group just above its threshold (μ large, the bracket's ends far apart), one just below
    (exactly zero), one pulled to max_norm (‖x_g‖ = h to the acc dtype's precision)."""
    g = torch.Generator().manual_seed(3)
    D = torch.exp(4 * torch.rand(3, 300, generator=g, dtype=torch.float64) - 2)  # D in [e^-2, e^2]
    y = torch.randn(3, 300, generator=g, dtype=torch.float64)
    norms = (D * y).norm(dim=1)
    t3 = float(norms[0]) * (1 - 1e-6)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        w = y.clone().to(dtype)
        w[1] *= float(norms[0] / norms[1]) * (1 - 2e-6)  # below t3: zero
        w[2] *= 10  # far above: pulled to the bound
        row = torch.tensor([0.0, 1.0, t3, 0.0, 0.5, 0.0], dtype=acc_of(dtype))
        expected = w.clone()
        _ops.prox_("torch", [expected], None, Groups((0,), (1,)), row, metric=[Metric(D.to(dtype), root=False)])
        _ops.prox_("triton", [w], None, Groups((0,), (1,)), row, metric=[Metric(D.to(dtype), root=False)])
        assert torch.equal(w[1], torch.zeros_like(w[1]))
        assert w[2].double().norm().item() == pytest.approx(0.5, rel=rel)
        # (Just above its threshold a group's x is ~1e-6 of y, with the relative error of ‖u‖ - t3:
        # the acc dtype's rounding of the inputs, relative to y.)
        torch.testing.assert_close(w.double(), expected.double(), rtol=100 * rel, atol=rel / 10)
