"""Float64 references, computed independently of fastreg, and the tolerances the maths allows.

Groups are taken with ``movedim`` + ``reshape`` on float64 copies (never with fastreg's memory
geometry), so a kernel that finds a group in the wrong place cannot agree by construction.
"""

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def eps(dtype):
    return torch.finfo(dtype).eps


def _d(t, c=None):
    w = t.detach().double()
    return w if c is None else w - c.detach().double()


def groups_of(x, group_dim):
    """``(G, n)``: row ``g`` holds group ``g`` (``x.select(group_dim, g)``) of a float64 tensor."""
    n = x.shape[group_dim]
    return x.movedim(group_dim, 0).reshape(n, x.numel() // n if n else 0)


def has_groups(t, group_dim):
    return group_dim is not None and group_dim >= 0 and t.ndim >= 2


def group_norms(t, group_dim, c=None):
    return groups_of(_d(t, c), group_dim).square().sum(dim=1).sqrt()


def sums(tensors, centers=None, group_dim=None, threshold=0.0):
    """[Σ|s|, Σs², Σ_g ‖s_g‖] in float64 (s = d, or its soft-thresholded magnitudes)."""
    centers = centers if centers is not None else [None] * len(tensors)
    total = torch.zeros(3, dtype=torch.float64)
    for t, c in zip(tensors, centers):
        s = (_d(t, c).abs() - threshold).clamp(min=0)
        total[0] += s.sum()
        total[1] += s.square().sum()
        if has_groups(t, group_dim):
            total[2] += groups_of(s, group_dim).square().sum(dim=1).sqrt().sum()
    return total


def group_sq(tensors, group_dim, centers=None, threshold=0.0):
    """The concatenated squared group norms (tensors with ndim >= 2 only)."""
    centers = centers if centers is not None else [None] * len(tensors)
    parts = [groups_of((_d(t, c).abs() - threshold).clamp(min=0), group_dim).square().sum(dim=1)
             for t, c in zip(tensors, centers) if has_groups(t, group_dim)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def value(tensors, l1=0.0, l2=0.0, group=0.0, group_dim=0, centers=None):
    s = sums(tensors, centers, group_dim if group else None)
    return (l1 * s[0] + l2 * s[1] + group * s[2]).item()


def grad(t, l1=0.0, l2=0.0, group=0.0, group_dim=0, c=None, scale=None):
    """l1·sign(d) + 2·l2·d + group·d_g/‖d_g‖ (+ scale_g·d: a given per-group coefficient)."""
    d = _d(t, c)
    g = l1 * torch.sign(d) + 2 * l2 * d
    if has_groups(t, group_dim) and (group or scale is not None):
        norms = groups_of(d, group_dim).square().sum(dim=1).sqrt()
        per_group = torch.where(norms > 0, group / torch.where(norms > 0, norms, 1), 0)
        if scale is not None:
            per_group = per_group + scale.double()
        g = g + (d.movedim(group_dim, -1) * per_group).movedim(-1, group_dim)
    return g


def prox(t, lr, l1=0.0, l2=0.0, group=0.0, group_dim=0, c=None):
    d = _d(t, c)
    s = torch.sign(d) * torch.clamp(d.abs() - lr * l1, min=0)
    if has_groups(t, group_dim) and group:
        norms = groups_of(s, group_dim).square().sum(dim=1).sqrt()
        factor = torch.where(norms > 0, (1 - lr * group / torch.where(norms > 0, norms, 1)).clamp(min=0), 0)
        s = (s.movedim(group_dim, -1) * factor).movedim(-1, group_dim)
    s = s / (1 + 2 * lr * l2)
    return s if c is None else s + c.detach().double()


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
    (default: torch's default device, which the ``backend`` fixture sets for GPU backends).
    A size is an int (1-D) or a shape tuple."""
    generator = torch.Generator().manual_seed(seed)
    device = torch.get_default_device() if device is None else device
    return [torch.randn(n, generator=generator, dtype=torch.float64, device="cpu").to(device=device, dtype=dtype)
            for n in sizes]
