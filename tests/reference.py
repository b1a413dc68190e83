"""Float64 references, computed independently of fastreg, and the tolerances the maths allows."""

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def eps(dtype):
    return torch.finfo(dtype).eps


def sums(tensors):
    """[Σ|w|, Σw²] in float64."""
    abs_total = sum((t.detach().double().abs().sum() for t in tensors), torch.tensor(0.0, dtype=torch.float64))
    sq_total = sum((t.detach().double().square().sum() for t in tensors), torch.tensor(0.0, dtype=torch.float64))
    return torch.stack([abs_total, sq_total])


def value(tensors, l1=0.0, l2=0.0):
    s = sums(tensors)
    return (l1 * s[0] + l2 * s[1]).item()


def grad(t, l1=0.0, l2=0.0):
    w = t.detach().double()
    return l1 * torch.sign(w) + 2 * l2 * w


def prox(t, lr, l1=0.0, l2=0.0):
    w = t.detach().double()
    return torch.sign(w) * torch.clamp(w.abs() - lr * l1, min=0) / (1 + 2 * lr * l2)


def sum_rtol(dtype):
    """Relative error allowed on a sum: fp32 accumulation of exactly-representable inputs."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def assert_close_elementwise(actual, expected, bound_scale, dtype, ulps=2):
    """|actual - expected| <= ulps * eps(dtype) * bound_scale, elementwise (rounding-error bound)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    error = (actual.double() - expected).abs()
    bound = ulps * eps(dtype) * bound_scale + torch.finfo(dtype).tiny
    worst = (error - bound).max().item() if error.numel() else -1.0
    assert worst <= 0, f"max error {error.max().item():.3e} exceeds the rounding bound"


def make_tensors(sizes, dtype, seed=0, device=None):
    """N(0, 1) tensors drawn on the CPU (reproducible everywhere), then moved to ``device``
    (default: torch's default device, which the ``backend`` fixture sets for GPU backends)."""
    generator = torch.Generator().manual_seed(seed)
    device = torch.get_default_device() if device is None else device
    return [torch.randn(n, generator=generator, dtype=torch.float64, device="cpu").to(device=device, dtype=dtype)
            for n in sizes]
