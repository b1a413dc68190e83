"""The penalty's terms as named data: the one place that says what each slot of the vectors
exchanged with the kernels means. Every backend reads these names; the C++ kernels mirror them
in ``csrc/terms.h`` (``fastreg_cpu::Sum``, ``Gradient``, ``Prox``) and the Triton kernels as constexprs;
each backend checks at load time that its copy agrees with this one (``check_mirror``; the cpu
backend reads its copy from ``fastreg_cpu::term_layout()``).

With ``d = w - c`` (``c`` the center, 0 without one) and ``d_g`` the groups of ``d``:

``Sum``  the sums vector every ``sums`` / ``add_grad_`` returns, one entry per term:
         ``[Σ|s|, Σs², Σ_g ‖s_g‖]`` (``s = d``, or the shrunk ``d`` of a proximal step).
``Gradient``  the coefficients of ``grads`` / ``add_grad_``: the gradient is
         ``L1·sign(d) + 2·L2·d + GROUP·d_g/‖d_g‖`` (0 for a zero group). Slot ``i`` multiplies
         the derivative of sum ``i``: autograd hands the backward exactly ``[l1, l2, group]``.
``Prox``  the coefficients of ``prox_`` for a step ``lr``: ``THRESHOLD = lr·l1`` (soft
         threshold), ``DENOMINATOR = 1 + 2·lr·l2``, ``GROUP_THRESHOLD = lr·group``, and the
         constraints on each group's norm and sign: ``MIN_NORM`` (0: none), ``MAX_NORM`` (inf:
         none), ``NONNEG`` (1: ``d >= 0``, else 0). The step is the exact proximal operator of
         the sum of the terms and the constraint (``prox_factor``).

Every coefficient operand is a table with one row per tensor of the call (``(T, len(Gradient))``
or ``(T, len(Prox))``): each tensor has its own settings, all in one launch.

Adding a term: a slot here, its sum and gradient in each backend's term maths (``csrc/terms.h``,
``backends/triton/kernels.py`` ``_apply``, ``backends/torch.py`` ``_gradient``), its coefficient in
``fastreg._coefficients``.
"""

from enum import IntEnum
from typing import NamedTuple

import torch

from fastreg.backends._geometry import WHOLE, logical_groups


class Sum(IntEnum):
    ABS = 0  # Σ|s|: the L1 term
    SQUARE = 1  # Σs²: the L2 term
    GROUP_NORM = 2  # Σ_g ‖s_g‖: the group lasso term


class Gradient(IntEnum):
    L1 = 0
    L2 = 1
    GROUP = 2


class Prox(IntEnum):
    THRESHOLD = 0
    DENOMINATOR = 1
    GROUP_THRESHOLD = 2
    MIN_NORM = 3
    MAX_NORM = 4
    NONNEG = 5


SUMS = len(Sum)
GRADIENT_SLOTS = len(Gradient)
PROX_SLOTS = len(Prox)


class MetricSlot(IntEnum):
    """The columns of a metric table (``MetricOperand.table``), one row per tensor: how its
    ``D`` is formed from the metric tensor ``v`` (and RMSprop's running mean ``m``)."""

    SCALE = 0  # D = √((v − m²)·SCALE) + EPS  (Adam: SCALE = 1/(1 − β₂ᵗ), its bias correction)
    EPS = 1
    ROOT = 2  # 1: the formula above; 0: D = v (a metric given as it is)
    IDENTITY = 3  # 1: D = 1 (no metric for this tensor: the Euclidean step; v is not read)
    CENTERED = 4  # 1: m is given (RMSprop(centered=True)); 0: m = 0


METRIC_SLOTS = len(MetricSlot)


class Metric(NamedTuple):
    """One tensor's diagonal metric for ``prox_(..., metric=...)``, read where it lives (an
    optimizer's state is never copied): ``D = √((v − centered²)·scale) + eps``, or ``D = v``
    with ``root=False`` (a metric given as it is)."""

    v: torch.Tensor
    scale: float = 1.0
    eps: float = 0.0
    root: bool = True
    centered: torch.Tensor | None = None  # RMSprop(centered=True): its running mean of g


class MetricOperand(NamedTuple):
    """The metric of a kernel call, as the kernels take it: ``v[t]`` (the metric tensor of
    ``params[t]``; the param itself where ``IDENTITY``, never read), ``centered[t]`` (a tensor
    or None) and ``table`` ``(T, len(MetricSlot))`` in the acc dtype on the device. The ``v``
    and ``centered`` tensors of a call share one dtype (``fastreg._ops`` splits a call where
    they differ); they have their param's shape, any layout."""

    v: list
    centered: list
    table: torch.Tensor

    @classmethod
    def of(cls, metrics, params, acc):
        """From one ``Metric`` (or None: D = 1) per param."""
        rows = [(1.0, 0.0, 0.0, 1.0, 0.0) if m is None else
                (float(m.scale), float(m.eps), float(bool(m.root)), 0.0, float(m.centered is not None))
                for m in metrics]
        table = torch.tensor(rows, dtype=acc).reshape(len(params), METRIC_SLOTS).to(params[0].device)
        return cls([p if m is None else m.v for m, p in zip(metrics, params)],
                   [None if m is None else m.centered for m in metrics], table)


def metric_values(v, centered, row, dtype):
    """``D`` of one tensor as a ``dtype`` tensor (``row``: its metric table row): the formula
    every backend's kernel follows; the torch backend's reference step uses it as written."""
    if row[MetricSlot.IDENTITY] != 0:
        return torch.ones(v.shape, dtype=dtype, device=v.device)
    d = v.to(dtype)
    if row[MetricSlot.ROOT] == 0:
        return d
    if centered is not None and row[MetricSlot.CENTERED] != 0:
        d = d - centered.to(dtype).square()
    return (d * row[MetricSlot.SCALE].to(dtype)).sqrt_().add_(row[MetricSlot.EPS].to(dtype))


# The value of each slot when a caller gives fewer (a short vector is a uniform table).
DEFAULTS = {Gradient: (0.0, 0.0, 0.0), Prox: (0.0, 1.0, 0.0, 0.0, float("inf"), 0.0)}


def as_table(coeffs, count, kind):
    """``coeffs`` as a ``(count, len(kind))`` table: a table as it is (with fewer columns, the
    trailing slots take their ``DEFAULTS``), a vector as every tensor's row (a broadcast view)."""
    width = len(kind)
    if coeffs.ndim == 2:
        if coeffs.shape[1] >= width:
            return coeffs
        missing = coeffs.new_tensor(DEFAULTS[kind][coeffs.shape[1]:]).expand(coeffs.shape[0], -1)
        return torch.cat([coeffs, missing], dim=1)
    if coeffs.numel() < width:
        coeffs = torch.cat([coeffs, coeffs.new_tensor(DEFAULTS[kind][coeffs.numel():])])
    return coeffs[:width].expand(count, width)


def layout():
    """Every named slot as ``(enum, name, value)``, for comparing with a backend's mirror."""
    return [(enum.__name__, member.name, int(member)) for enum in (Sum, Gradient, Prox, MetricSlot)
            for member in enum]


def check_mirror(backend, mirrored):
    """``RuntimeError`` unless ``mirrored`` (a backend's ``{(enum, name): value}``) names every
    slot with the value it has here."""
    expected = {(enum, name): value for enum, name, value in layout()}
    wrong = {key: mirrored.get(key) for key, value in expected.items() if mirrored.get(key) != value}
    if wrong:
        raise RuntimeError(f"fastreg: the {backend} backend's term slots disagree with fastreg.backends._terms: "
                           + ", ".join(f"{e}.{n} = {v} (expected {expected[(e, n)]})" for (e, n), v in wrong.items()))


# ------------------------------------------------------------------------------------------
# The proximal step of the sum of the terms, per group.
#
# For one group with y = d (after the optimizer's step), t1 = THRESHOLD, den = DENOMINATOR,
# t3 = GROUP_THRESHOLD and the constraint lo <= ‖x‖ <= hi (MIN_NORM, MAX_NORM; x >= 0 with NONNEG):
#
#     x = argmin ½‖x − y‖² + t1‖x‖₁ + ½(den − 1)‖x‖² + t3‖x‖ + ι(constraint)
#
# Dividing by den: ½‖x − y/den‖² + (t1/den)‖x‖₁ + (t3/den)‖x‖ + ι. The radial part
# f(x) = φ(‖x‖) (the group norm and the norm bounds) and the separable part g (L1, and x >= 0)
# decompose: prox_{f+g} = prox_f ∘ prox_g whenever ∂g(u) ⊆ ∂g(αu) for 0 <= α <= 1, which holds
# for every positively homogeneous g (L1, the orthant's indicator) — for a convex φ; for the
# annulus (lo > 0, not convex) the argmin over a sphere of radius r is r·s/‖s‖ whenever s ≠ 0
# (max ⟨x, y⟩ − t1‖x‖₁ on the sphere), which gives the same composition. So with
#     s = sign(y)·max(|y| − t1, 0)     (NONNEG: s = max(y − t1, 0))
# the minimiser is x = (r/‖s‖)·s with r = clip((‖s‖ − t3)/den, lo, hi): the factor below.
# A zero s stays zero (no direction to move it in; Keras' constraints do the same), and the
# plan refuses a lower bound together with L1 or NONNEG, where s = 0 need not mean y = 0 and the
# exact step would pick a coordinate (an argmax). tests/test_prox_exact.py checks every
# combination against a numerical solve in float64.


def prox_group_factor(norms, group_threshold, denominator, min_norm, max_norm):
    """The factor on the shrunk ``s`` of each group, given ``‖s_g‖``: ``clip((‖s‖ − t3)/den,
    lo, hi) / ‖s‖`` (0 for a zero group), written as ``max(0, 1 − t3/‖s‖)/den`` bounded by
    ``lo/‖s‖`` and ``hi/‖s‖``, so that without constraints it is exactly the unconstrained step."""
    positive = norms > 0
    safe = torch.where(positive, norms, 1)
    base = torch.clamp(1 - group_threshold / safe, min=0) / denominator
    factor = torch.minimum(torch.maximum(base, min_norm / safe), max_norm / safe)
    return torch.where(positive, factor, 0)


# ------------------------------------------------------------------------------------------
# The proximal step in a diagonal metric D (an optimizer's preconditioner), per group:
#
# w = argmin_x ½‖x − y‖²_D + lr·R(x), D = diag(D_i) > 0 (Adam: √v̂ + ε), per coordinate:
#   u = sign(y)·max(D|y| − t1, 0)   (NONNEG: max(D·y − t1, 0))    = D·soft(y, t1/D)
#   no groups:  x = u / (D + c2)                                   (c2 = DENOMINATOR − 1 = 2·lr·l2)
#   a group:    x = u / (D + c2 + μ), with μ = t3/‖x‖: zero iff ‖u‖ <= t3, else the root of
#               μ·f(μ) = t3, f(μ) = ‖u/(D + c2 + μ)‖ (increasing in μ from 0 to ‖u‖);
#               with MAX_NORM = h and f(μ) > h at that root, the root of f(μ) = h instead
#               (the bound's multiplier adds to μ); with MIN_NORM = l and f(μ) < l (or a zero
#               group), the root λ of f(λ) = l on (−min a, μ) (the bound's multiplier, negative
#               when the bound pushes the group out beyond the unconstrained x at μ = 0).
# Each is the stationarity condition of the problem (the L1 part is separable and keeps y's
# sign), so the step is exact; with D = 1 it is the Euclidean step.
#
# Why clipping the norm is exact with a lower bound, which makes the problem non-convex (the
# plan allows it without L1 and NONNEG only, so u = D·y): write F(r) = φ(r) + t3·r with φ(r)
# the minimum of q(x) = ½xᵀAx − uᵀx (A = diag(a)) on the sphere ‖x‖ = r, a trust-region
# subproblem. Its dual is exact (the S-lemma): φ(r) = max over λ >= −min a of
# −½Σuᵢ²/(aᵢ + λ) − ½λr², so dφ/dr = −λ(r)·r with λ(r) the root of f(λ) = r, decreasing in r.
# For r below f(0), λ > 0 and λ·f(λ) = ‖λu/(a + λ)‖ increases with λ, so F'(r) = t3 − λ(r)·r
# increases with r; beyond f(0), λ < 0 and F' > 0. F falls then rises: its minimum on
# [l, h] is the unconstrained radius clipped to [l, h], as in the Euclidean step.
# The hard case: when u has no mass on the coordinates where a is smallest, f stays finite as
# λ → −min a, and l can lie beyond that limit; then λ = −min a, x = u/(a − min a) off those
# coordinates and the rest of the norm, √(l² − f_limit²), lies on them. Any direction within
# them is a minimiser; the step spreads it evenly with a positive sign (``spread``: the same
# value on each), a rule every backend follows. A zero u stays zero, as in the Euclidean step.
# A group at a lower bound is solved and written in σ = λ + min a (x = u/((a − min a) + σ)),
# which keeps the divisor's precision where λ is close to −min a.
# These float64 torch functions are the reference (the torch backend's step, and coupled
# groups' in fastreg._ops); the cpu and Triton kernels follow them element by element.


def metric_shrink(y, D, row):
    """``(u, a)`` of ``y = w − c`` in the metric ``D`` with a Prox ``row``: ``u`` the shrunk
    ``D·y`` and ``a = D + DENOMINATOR − 1`` (float64 tensors; ``row`` in float64 too, since
    ``DENOMINATOR − 1 = 2·lr·l2`` is often below float32's resolution next to 1)."""
    t1, c2 = row[Prox.THRESHOLD].double(), row[Prox.DENOMINATOR].double() - 1
    nonneg = row[Prox.NONNEG] != 0
    magnitude = torch.where(nonneg, y.clamp(min=0), y.abs())
    u = (D * magnitude - t1).clamp(min=0)
    return torch.where(nonneg | (y >= 0), u, -u), D + c2


def metric_step(u, a, mu, shift, spread, dim, size):
    """``x = u/((a − shift_g) + μ_g)`` per group (0 where ``μ_g`` is inf: the group is exactly
    zero; the group's ``spread`` where that divisor is 0: the hard case of a lower norm bound)."""
    u_rows, a_rows = logical_groups(u, dim, size), logical_groups(a, dim, size)
    zero = ~torch.isfinite(mu)
    q = (a_rows - shift[:, None]) + torch.where(zero, 0.0, mu)[:, None]
    x_rows = torch.where(zero[:, None], 0.0, torch.where(q == 0, spread[:, None], u_rows / q))
    if dim == WHOLE:
        return x_rows.reshape(u.shape)
    return x_rows.reshape(u.movedim(dim, 0).shape).movedim(0, dim)


def metric_multiplier(u, a, t3, lo, hi, iterations=60, reduce=None):
    """Per group (rows of ``u`` and ``a = D + c2``), ``(μ, shift, spread)`` for
    ``x = u/((a − shift) + μ)``: ``μ`` inf for a group that is exactly zero; ``shift`` 0, or
    ``min a`` for a group held at a lower bound ``lo`` (then ``μ = λ + min a`` >= 0, found and
    applied without cancelling next to ``λ = −min a``); ``spread`` the value where the divisor
    is 0 (the hard case; 0 elsewhere). Safeguarded Newton in float64 on a bracket from
    ``min a`` and ``max a``.

    ``reduce``: None (each row holds its whole group), or ``reduce(op, values)`` with ``op`` one
    of ``"sum"``, ``"min"``, ``"max"``: the per-row ``values`` (shape ``(k, groups)``) of this
    part of every group combined with the other parts' (an all-reduce over the ranks a sharded
    group spans; ``fastreg._sharded``). Every sum, min and max over a group's elements goes
    through it (the norms, ``min a`` and ``max a``, f and its slope at every Newton iteration,
    the lower bound's mass, count and limit at ``min a``), so every part gets the same values
    and takes the same branches and the same number of iterations. Without it the step is
    bitwise the one it always was."""
    sums = _RowSums(reduce)
    norm_u = sums.norm(u)
    a_min, a_max = sums.min_max(a, norm_u)
    zero = norm_u <= t3
    safe_gap = torch.where(zero, 1.0, norm_u - t3)

    def f_and_slope(mu, base=a):
        q = base + mu[:, None]
        r = torch.where(u == 0, 0.0, u / q)  # a zero u is 0 whatever q is (0 in the hard case)
        if reduce is None:
            f = r.norm(dim=1)
            slope = -torch.where(u == 0, 0.0, r * r / q).sum(dim=1) / torch.where(f > 0, f, 1.0)
            return f, slope
        square = r * r
        both = reduce("sum", torch.stack([square.sum(dim=1), torch.where(u == 0, 0.0, square / q).sum(dim=1)]))
        f = both[0].sqrt()
        return f, -both[1] / torch.where(f > 0, f, 1.0)

    mu = torch.zeros_like(norm_u)
    if t3 > 0:  # μ·f(μ) = t3 on [t3·a_min/(‖u‖ − t3), t3·a_max/(‖u‖ − t3)]
        mu = _newton(lambda m: _times_f(m, f_and_slope, t3), t3 * a_min / safe_gap, t3 * a_max / safe_gap,
                     iterations)
    if torch.isfinite(hi):
        f, _ = f_and_slope(mu)
        over = (f > hi) & ~zero
        if bool(over.any()):  # f(μ) = h on [max(μ, ‖u‖/h − a_max), ‖u‖/h − a_min]
            lower = torch.maximum(mu, norm_u / hi - a_max)
            upper = torch.maximum(lower, norm_u / hi - a_min)
            bound = _newton(lambda m: _minus_f(m, f_and_slope, hi), lower, upper, iterations)
            mu = torch.where(over, bound, mu)
    shift, spread = torch.zeros_like(norm_u), torch.zeros_like(norm_u)
    if lo > 0:
        f, _ = f_and_slope(mu)
        under = (norm_u > 0) & (zero | (f < lo))
        if bool(under.any()):
            sigma, spread = _lower_bound(u, a - a_min[:, None], a_max - a_min, norm_u, mu + a_min, zero, under, lo,
                                         f_and_slope, iterations, sums)
            mu, shift = torch.where(under, sigma, mu), torch.where(under, a_min, shift)
            zero = zero & ~under
    return torch.where(zero, torch.inf, mu), shift, spread


class _RowSums:
    """The sums, minima and maxima over each row of a group matrix: the rows' own (``reduce``
    None: the reference's expressions as written), or combined over the parts of each group
    through ``reduce`` (see ``metric_multiplier``)."""

    def __init__(self, reduce):
        self.reduce = reduce

    def norm(self, x):
        if self.reduce is None:
            return x.norm(dim=1)
        return self.reduce("sum", (x * x).sum(dim=1)[None])[0].sqrt()

    def min_max(self, a, like):
        """``(min a, max a)`` per row; 1 for a group without elements."""
        if self.reduce is None:
            if a.shape[1] == 0:
                return torch.ones_like(like), torch.ones_like(like)
            return a.min(dim=1).values, a.max(dim=1).values
        if a.shape[1] == 0:  # an empty part: the other parts decide
            low, high = torch.full_like(like, torch.inf), torch.full_like(like, -torch.inf)
        else:
            low, high = a.min(dim=1).values, a.max(dim=1).values
        both = self.reduce("max", torch.stack([-low, high]))  # one collective for both
        low, high = -both[0], both[1]
        empty = ~torch.isfinite(low)  # no part has an element
        return torch.where(empty, 1.0, low), torch.where(empty, 1.0, high)

    def at_min(self, u, above, at_min):
        """``(mass, count, limit)`` per row: ``Σu²`` and the number of elements where ``above``
        is 0, and ``‖u/above‖`` over the others."""
        if self.reduce is None:
            mass = torch.where(at_min, u * u, 0.0).sum(dim=1)
            count = at_min.sum(dim=1)
            limit = torch.where(at_min, 0.0, u / torch.where(at_min, 1.0, above)).norm(dim=1)
            return mass, count, limit
        ratio = torch.where(at_min, 0.0, u / torch.where(at_min, 1.0, above))
        three = self.reduce("sum", torch.stack([torch.where(at_min, u * u, 0.0).sum(dim=1),
                                                at_min.sum(dim=1).to(u.dtype), (ratio * ratio).sum(dim=1)]))
        return three[0], three[1], three[2].sqrt()


def _lower_bound(u, above, spread_a, norm_u, sigma_at_mu, zero, under, lo, f_and_slope, iterations, sums):
    """``(σ, spread)`` of the groups ``under`` the lower bound ``lo``, with ``above = a − min a``
    and σ = λ + min a: the root of f = lo, f(σ) = ‖u/(above + σ)‖, on
    [max(0, ‖u‖/lo − (max a − min a)), min(μ + min a, ‖u‖/lo)], found on 1/f − 1/lo (nearly
    linear next to the pole at σ = 0, where f is not); in the hard case (no u where ``above``
    is 0, and f's limit at σ = 0 within lo) σ = 0 and the spread."""
    at_min = above == 0
    mass_at_min, count_at_min, f_limit = sums.at_min(u, above, at_min)
    hard = under & (mass_at_min == 0) & (f_limit <= lo)
    spread = torch.where(hard, ((lo * lo - f_limit * f_limit).clamp(min=0) / count_at_min.clamp(min=1)).sqrt(), 0.0)
    lower = (norm_u / lo - spread_a).clamp(min=0)
    upper = torch.where(zero, norm_u / lo, torch.minimum(norm_u / lo, sigma_at_mu))
    solve = under & ~hard
    lower, upper = torch.where(solve, lower, 1.0), torch.where(solve, upper, 1.0)  # the rest: a fixed point
    root = _newton(lambda m: _inverse_minus(m, lambda x: f_and_slope(x, above), lo), lower, upper, iterations)
    return torch.where(hard, 0.0, torch.where(solve, root, 0.0)), spread


def _times_f(mu, f_and_slope, t3):
    f, slope = f_and_slope(mu)
    return mu * f - t3, f + mu * slope  # increasing in μ


def _minus_f(mu, f_and_slope, hi):
    f, slope = f_and_slope(mu)
    return hi - f, -slope  # increasing in μ


def _inverse_minus(mu, f_and_slope, lo):
    f, slope = f_and_slope(mu)
    return 1 / f - 1 / lo, -slope / (f * f)  # increasing in μ (f decreases)


def _newton(fn, lower, upper, iterations):
    """The root of an increasing ``fn`` (value, slope) in ``[lower, upper]``, per entry: Newton
    steps that stay inside the bracket, bisection otherwise; stops when no entry moves."""
    x = (lower + upper) / 2
    for _ in range(iterations):
        value, slope = fn(x)
        lower = torch.where(value < 0, x, lower)
        upper = torch.where(value > 0, x, upper)
        step = x - value / torch.where(slope > 0, slope, 1.0)
        inside = (step > lower) & (step < upper) & (slope > 0)
        new = torch.where(inside, step, (lower + upper) / 2)
        if bool(((new - x).abs() <= 4 * torch.finfo(torch.float64).eps * new.abs()).all()):
            return new
        x = new
    return x
