"""The Triton kernels: every term's maths on the device, a few launches per call.

Five kernels: ``_sums_kernel`` (stage 1 of the sums: one ``[Σ|s|, Σs²]`` pair per program and
the group partials), ``_group_sq_kernel`` and ``_finish_kernel`` (stage 2: the groups' squared
norms, then every tensor's own sums), ``_elementwise_kernel`` (``grads``, ``add_grad_`` and
``prox_``, one op per specialization), and ``_metric_prox_kernel`` (``prox_`` in a diagonal
metric), with their ``@triton.jit`` helpers. The launchers are in
``launch.py``, the tables the kernels read in ``tables.py``. Importing this module needs triton.

* **Modes.** Every tensor of a call is cut into programs (CUDA blocks) of about ``chunk``
  elements, in one of three modes, chosen per tensor from its own structure (``tables.py``); a
  launch runs one mode:

  ``MODE_FLAT``  a tensor without groups: a contiguous chunk, walked in ``BLOCK`` tiles, all
                 but the last unmasked (vectorised loads).
  ``MODE_RUNS``  a tensor whose groups are runs of ``K >= MIN_RUN`` contiguous elements (blocks
                 of rows of a contiguous weight), or a tensor of one group (``WHOLE``: one run
                 of ``numel``): a ``[BLOCK // RUN_TILE, RUN_TILE]`` tile of whole runs (rows)
                 walked along ``K``; one partial per run.
  ``MODE_ROWS``  a tensor whose runs are short (blocks of ``k`` columns of a Linear weight:
                 ``K = k``; a 1-D tensor's groups of ``k`` elements: ``A = 1``): a
                 ``BLOCK``-wide window of positions of its ``(A, G*K)`` memory view, walked
                 down ``chunk // BLOCK`` rows; one float64 partial per position.

  A program reads its tensor, range and partials' slot from its row of the launch's table
  (``_program``), the tensor's pointers from the pointer tables (cast to the dtype with
  ``tl.pointer_type``: the pattern of Triton's grouped-GEMM tutorial) and its geometry from its
  row of the per-tensor table (``_geometry``), which also names its index in the call: the row
  of the coefficient tables it reads (empty tensors have no programs, so the two differ).
* **Ops.** ``_elementwise_kernel`` computes ``OP_GRADS`` (out = gradient), ``OP_ADD_GRAD``
  (out += gradient, and the sums of its ``MODE_FLAT`` tensors) or ``OP_PROX`` (w = the proximal
  step, ``NONNEG`` included); the term maths is ``_apply``, the one place for it.
* **Per-tensor coefficients.** Every coefficient operand is a ``(T, SLOTS)`` table: a program
  loads its own tensor's row (``coeffs + param * GRADIENT_SLOTS + GRADIENT_L1``), so tensors with
  different settings share one launch. What depends on a group's norm (the group term's
  coefficient, the prox factor with its norm bounds) is formed per group by the launcher from
  the row of the group's own tensor, and read as ``group_coef``.
* **Named constants.** Triton lets a ``@triton.jit`` function read a module global only when
  it is a ``tl.constexpr`` instance (``MODE_FLAT = tl.constexpr(0)``; the annotated form
  ``MODE_FLAT: tl.constexpr = 0`` is refused by the compiler), so the modes, the ops, the term
  slots and the tables' row widths are such instances: folded at compile time, as a literal
  would be, and passed as they are by the host (``MODE=MODE_RUNS``). The slots and widths mirror
  ``fastreg.backends._terms``; the package checks the mirror when it loads
  (``unavailable_reason()`` names a disagreement).
* **64-bit offsets.** ``tl.program_id(0)`` is widened to int64 first; table entries are int64,
  so offsets and masks are int64: tensors above 2**31 elements are fine.
* **Deterministic sums, no atomics.** Stage 1 writes one ``[Σ|s|, Σs²]`` pair per program and
  the group partials into their own slots; ``_group_sq_kernel`` adds each group's slots in a
  fixed order in float64, and ``_finish_kernel`` gives every tensor its own row of sums: the
  pairs of its programs (consecutive, in one launch) and ``Σ_g sqrt(group_sq)`` of its groups,
  in float64, in an order fixed by the tables.
* **Coefficients** are loaded inside the kernels from device tensors (the per-group ones are
  formed on the device by the launchers): no host sync, so a step can be CUDA-graph captured.
* **The step in a diagonal metric** (``prox_(..., metric=...)``) is ``_metric_prox_kernel``: it
  reads ``w``, ``c`` and the metric tensors ``v`` (and ``m``) of one element together and forms
  ``D`` there (``_metric_terms``), so nothing of the size of a tensor is written but ``w``. A
  tensor without groups is walked as in ``MODE_FLAT`` (the same programs). A group's step needs
  a root of a scalar equation that depends on all its elements, so ``MODE_GROUP`` runs one program
  per group, looping over the group's elements: a pass for ``‖u‖²``, ``min a`` and ``max a``;
  safeguarded Newton iterations on the brackets of ``_terms.metric_multiplier`` (the group
  threshold's root, the max norm's, the min norm's in σ = λ + min a, with its hard case),
  each a pass over the group (which is then in cache), at most ``NEWTON_STEPS`` and none once
  the root no longer moves; then the pass that writes ``w``. Its elements, ``A`` runs of ``K``
  (``_geometry``), are walked ``BLOCK`` at a time as one list: each lane carries its (run,
  offset) and steps it with an addition and a carry (``_advance``), not a division per element.
"""

import torch
import triton
import triton.language as tl

# How a program walks its tensor (see "Modes"); tables.py picks one per tensor.
MODE_FLAT = tl.constexpr(0)
MODE_RUNS = tl.constexpr(1)
MODE_ROWS = tl.constexpr(2)

# The metric step's walk of a tensor with groups (see "The step in a diagonal metric"): one
# program per group (the others are tables.py's, chosen per tensor; this one per call).
MODE_GROUP = tl.constexpr(3)
NEWTON_STEPS = tl.constexpr(40)  # a group's root finding: at most this many passes over it
NEWTON_TOL_F32 = tl.constexpr(4 * 2.0**-23)  # the root no longer moves: 4 ulps of the acc dtype
NEWTON_TOL_F64 = tl.constexpr(4 * 2.0**-52)
# The equation a group's root solves (_group_root), each increasing in its unknown: the group
# threshold's μ·f(μ) = t3, the max norm's f(μ) = hi, the min norm's 1/f(σ) = 1/lo (σ = λ + min a).
ROOT_GROUP = tl.constexpr(0)
ROOT_MAX_NORM = tl.constexpr(1)
ROOT_MIN_NORM = tl.constexpr(2)

# What _elementwise_kernel computes (see "Ops").
OP_GRADS = tl.constexpr(0)
OP_ADD_GRAD = tl.constexpr(1)
OP_PROX = tl.constexpr(2)

# The term slots of fastreg.backends._terms, mirrored (checked when the package loads).
SUM_ABS = tl.constexpr(0)  # Sum.ABS
SUM_SQUARE = tl.constexpr(1)  # Sum.SQUARE
SUM_GROUP_NORM = tl.constexpr(2)  # Sum.GROUP_NORM
GRADIENT_L1 = tl.constexpr(0)  # Gradient.L1
GRADIENT_L2 = tl.constexpr(1)  # Gradient.L2
GRADIENT_GROUP = tl.constexpr(2)  # Gradient.GROUP (applied through group_coef, formed by the launcher)
PROX_THRESHOLD = tl.constexpr(0)  # Prox.THRESHOLD
PROX_DENOMINATOR = tl.constexpr(1)  # Prox.DENOMINATOR
PROX_GROUP_THRESHOLD = tl.constexpr(2)  # Prox.GROUP_THRESHOLD (applied through group_coef)
PROX_MIN_NORM = tl.constexpr(3)  # Prox.MIN_NORM (applied through group_coef)
PROX_MAX_NORM = tl.constexpr(4)  # Prox.MAX_NORM (applied through group_coef)
PROX_NONNEG = tl.constexpr(5)  # Prox.NONNEG
METRIC_SCALE = tl.constexpr(0)  # MetricSlot.SCALE
METRIC_EPS = tl.constexpr(1)  # MetricSlot.EPS
METRIC_ROOT = tl.constexpr(2)  # MetricSlot.ROOT
METRIC_IDENTITY = tl.constexpr(3)  # MetricSlot.IDENTITY
METRIC_CENTERED = tl.constexpr(4)  # MetricSlot.CENTERED
# The widths of the rows of the per-tensor tables (row t: params[t]'s), mirrored too.
SUMS = tl.constexpr(3)  # len(Sum): the per-tensor sums' row
GRADIENT_SLOTS = tl.constexpr(3)  # len(Gradient)
PROX_SLOTS = tl.constexpr(6)  # len(Prox)
METRIC_SLOTS = tl.constexpr(5)  # len(MetricSlot)


@triton.jit
def _sign(x):
    # sign(0) = 0, as torch.sign and the subgradient of abs; computed in x's dtype.
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _program(meta, MODE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """This program's (id, tensor, x0, x1, y0, slot); all int64. The element offsets among
    them (FLAT x0, RUNS x1 and y0, ROWS y0) are multiples of a tile, so for an aligned
    tensor they are hinted multiples of VEC: Triton can then prove 16-byte accesses."""
    pid = tl.program_id(0).to(tl.int64)
    row = meta + 5 * pid
    x0, x1, y0 = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    if ALIGNED:
        if MODE == MODE_FLAT:
            x0 = tl.multiple_of(x0, VEC)
        elif MODE == MODE_RUNS:
            x1 = tl.multiple_of(x1, VEC)
            y0 = tl.multiple_of(y0, VEC)
        else:
            y0 = tl.multiple_of(y0, VEC)
    return pid, tl.load(row), x0, x1, y0, tl.load(row + 4)


@triton.jit
def _geometry(info, t):
    """Tensor ``t``'s (numel, G, K, L, group base, runs, param): ``param`` is its index in the
    call (the row of the coefficient tables); ``t`` counts the non-empty tensors only."""
    row = info + 7 * t
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6))


@triton.jit
def _operand(ptrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from the table, cast to DTYPE."""
    ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _row_start(a, L, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    start = a * L
    if ALIGNED:
        start = tl.multiple_of(start, VEC)
    return start


@triton.jit
def _load_d(w, c, offs, mask, ACC: tl.constexpr, HAS_CENTER: tl.constexpr, MASKED: tl.constexpr):
    """d = w - c at ``offs`` in the acc dtype (0 where masked)."""
    if MASKED:
        x = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
        if HAS_CENTER:
            x -= tl.load(c + offs, mask=mask, other=0.0).to(ACC)
    else:
        x = tl.load(w + offs).to(ACC)
        if HAS_CENTER:
            x -= tl.load(c + offs).to(ACC)
    return x


@triton.jit
def _shrinking(shrink, param, ACC: tl.constexpr, SHRINK: tl.constexpr):
    """(threshold, nonneg) of the tensor whose row of the prox table ``shrink`` is ``param``
    (unread without SHRINK: ``shrink`` is then a placeholder)."""
    threshold = 0.0
    nonneg = 0.0
    if SHRINK:
        row = shrink + param * PROX_SLOTS
        threshold = tl.load(row + PROX_THRESHOLD).to(ACC)
        nonneg = tl.load(row + PROX_NONNEG).to(ACC)
    return threshold, nonneg


@triton.jit
def _magnitude(x, threshold, nonneg, SHRINK: tl.constexpr):
    """|s|: |d|, or max(|d| - threshold, 0), or max(d - threshold, 0) where ``nonneg`` (the
    shrunk values are then >= 0); NaN propagates. The tensor's ``nonneg`` is uniform over a
    program: a select, not a branch."""
    if SHRINK:
        magnitude = tl.where(nonneg != 0, x, tl.abs(x))
        return tl.maximum(magnitude - threshold, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.abs(x)


@triton.jit
def _sums_kernel(
    w_ptrs, c_ptrs,  # int64[T]: data pointers (c_ptrs = w_ptrs without centers)
    info,  # int64[7T]: per-tensor geometry
    meta,  # int64[5P]: per-program (tensor, x0, x1, y0, slot)
    partials,  # acc[2P]: (Σ|s|, Σs²) per program
    slots,  # acc[...]: group partials
    shrink,  # acc[T, PROX_SLOTS]: the prox table whose THRESHOLD and NONNEG shrink (SHRINK only)
    chunk,  # elements per FLAT program (a runtime value: one compiled kernel for every chunk)
    DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, HAS_CENTER: tl.constexpr,
    SHRINK: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RUN_TILE: tl.constexpr,
    VEC: tl.constexpr,
):
    pid, t, x0, x1, y0, slot = _program(meta, MODE, ALIGNED, VEC)
    numel, G, K, L, group_base, nruns, param = _geometry(info, t)
    w = _operand(w_ptrs, t, DTYPE, ALIGNED)
    c = _operand(c_ptrs, t, DTYPE, ALIGNED)
    thr, nonneg = _shrinking(shrink, param, ACC, SHRINK)
    if MODE == MODE_FLAT:  # elements [x0, x0 + chunk) of the tensor
        lanes = tl.arange(0, BLOCK)
        count = tl.minimum(numel - x0, chunk)
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            s = _magnitude(_load_d(w, c, x0 + i + lanes, None, ACC, HAS_CENTER, False), thr, nonneg, SHRINK)
            acc_abs += s
            acc_sq += s * s
        if full < count:
            offs = full + lanes
            s = _magnitude(_load_d(w, c, x0 + offs, offs < count, ACC, HAS_CENTER, True), thr, nonneg, SHRINK)
            acc_abs += s
            acc_sq += s * s
        tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))
    elif MODE == MODE_RUNS:  # runs [x0, x0 + BG) (a run: K elements), along k in [x1, y0)
        BG: tl.constexpr = BLOCK // RUN_TILE
        runs = x0 + tl.arange(0, BG).to(tl.int64)
        run_ok = runs < nruns
        cols = tl.arange(0, RUN_TILE)
        acc_abs = tl.zeros([BG, RUN_TILE], dtype=ACC)
        acc_sq = tl.zeros([BG, RUN_TILE], dtype=ACC)
        for k in range(x1, y0, RUN_TILE):
            kk = k + cols
            mask = run_ok[:, None] & (kk < y0)[None, :]
            offs = _row_start(runs, K, ALIGNED, VEC)[:, None] + kk[None, :]
            s = _magnitude(_load_d(w, c, offs, mask, ACC, HAS_CENTER, True), thr, nonneg, SHRINK)
            acc_abs += s
            acc_sq += s * s
        tl.store(partials + 2 * pid, tl.sum(tl.sum(acc_abs, axis=1), axis=0))
        per_run = tl.sum(acc_sq, axis=1)
        tl.store(partials + 2 * pid + 1, tl.sum(per_run, axis=0))
        tl.store(slots + slot + tl.arange(0, BG), per_run, mask=run_ok)
    else:  # MODE_ROWS: positions [y0, y0 + BLOCK) of rows [x0, x1)
        if ALIGNED:
            L = tl.multiple_of(L, VEC)  # so that the mask is constant over each vector
        cols = y0 + tl.arange(0, BLOCK).to(tl.int64)
        col_ok = cols < L
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float64)  # one column's squares over many rows
        for a in range(x0, x1):
            offs = _row_start(a, L, ALIGNED, VEC) + cols
            s = _magnitude(_load_d(w, c, offs, col_ok, ACC, HAS_CENTER, True), thr, nonneg, SHRINK)
            acc_abs += s
            acc_sq += (s * s).to(tl.float64)
        tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0).to(ACC))
        tl.store(slots + slot + tl.arange(0, BLOCK), acc_sq.to(ACC), mask=col_ok)


@triton.jit
def _group_sq_kernel(slots, ginfo, gmap, group_sq, GROUP_BLOCK: tl.constexpr):
    """group_sq[g] = Σ_i Σ_j slots[base + i·S1 + g·S2 + j], in a fixed order, in float64."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(gmap + 2 * pid)
    first = tl.load(gmap + 2 * pid + 1) * GROUP_BLOCK
    row = ginfo + 7 * t
    base, n1, s1, s2, n2 = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    groups, out = tl.load(row + 5), tl.load(row + 6)
    g = first + tl.arange(0, GROUP_BLOCK).to(tl.int64)
    ok = g < groups
    acc = tl.zeros([GROUP_BLOCK], dtype=tl.float64)
    for i in range(0, n1):
        for j in range(0, n2):
            acc += tl.load(slots + base + i * s1 + g * s2 + j, mask=ok, other=0.0).to(tl.float64)
    tl.store(group_sq + out + g, acc.to(group_sq.dtype.element_ty), mask=ok)


@triton.jit
def _finish_kernel(partials, group_sq, finfo, ntensors, out, TENSORS: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = [Σ|s|, Σs², Σ_g sqrt(group_sq[g])] of params[t], for the TENSORS tensors of this
    program: each adds its own partial pairs (``finfo``: first, count) and its own groups
    (first, count), BLOCK at a time, in float64. The order depends on the tables only: bitwise
    deterministic."""
    t = tl.program_id(0).to(tl.int64) * TENSORS + tl.arange(0, TENSORS).to(tl.int64)
    ok = t < ntensors
    row = finfo + 4 * t
    part0 = tl.load(row, mask=ok, other=0)
    nparts = tl.load(row + 1, mask=ok, other=0)
    group0 = tl.load(row + 2, mask=ok, other=0)
    ngroups = tl.load(row + 3, mask=ok, other=0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)[None, :]
    acc_abs = tl.zeros([TENSORS, BLOCK], dtype=tl.float64)
    acc_sq = tl.zeros([TENSORS, BLOCK], dtype=tl.float64)
    acc_norm = tl.zeros([TENSORS, BLOCK], dtype=tl.float64)
    for i in range(0, tl.max(nparts, axis=0), BLOCK):
        mask = i + lanes < nparts[:, None]
        pair = partials + 2 * (part0[:, None] + i + lanes)
        acc_abs += tl.load(pair, mask=mask, other=0.0).to(tl.float64)
        acc_sq += tl.load(pair + 1, mask=mask, other=0.0).to(tl.float64)
    for i in range(0, tl.max(ngroups, axis=0), BLOCK):
        mask = i + lanes < ngroups[:, None]
        acc_norm += tl.sqrt(tl.load(group_sq + group0[:, None] + i + lanes, mask=mask, other=0.0).to(tl.float64))
    out_row = out + SUMS * t
    tl.store(out_row + SUM_ABS, tl.sum(acc_abs, axis=1).to(out.dtype.element_ty), mask=ok)
    tl.store(out_row + SUM_SQUARE, tl.sum(acc_sq, axis=1).to(out.dtype.element_ty), mask=ok)
    tl.store(out_row + SUM_GROUP_NORM, tl.sum(acc_norm, axis=1).to(out.dtype.element_ty), mask=ok)


@triton.jit
def _apply(x, coef, c1, den, nonneg, c_val, old, OP: tl.constexpr, F64: tl.constexpr, MODE: tl.constexpr,
           PROMOTE: tl.constexpr):
    """The element-wise result of op OP for d = x (see ``_elementwise_kernel``); one return."""
    if OP == OP_PROX:  # c + s / den (MODE_FLAT) or c + s * factor (groups), s the shrunk d
        positive = nonneg != 0  # NONNEG: s = max(d - c1, 0), else sign(d) * max(|d| - c1, 0)
        magnitude = tl.where(positive, x, tl.abs(x))
        sign = tl.where(positive, 1.0, _sign(x)).to(x.dtype)
        shrunk = sign * tl.maximum(magnitude - c1, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if MODE == MODE_FLAT:
            if F64:
                r = shrunk / den
            else:
                r = tl.math.div_rn(shrunk, den)  # fp32 '/' is approximate on NVIDIA GPUs
        else:
            r = shrunk * coef
        value = (r + c_val).to(PROMOTE)
    else:
        gradient = c1 * _sign(x) + coef * x  # one FMA with fusion on: rounded once
        if OP == OP_ADD_GRAD:  # old + gradient in the wider dtype
            value = old.to(PROMOTE) + gradient.to(PROMOTE)
        else:
            value = gradient.to(PROMOTE)  # OP_GRADS
    return value


@triton.jit
def _store_as(value, DTYPE: tl.constexpr):
    """``value`` in DTYPE; float64 reaches 16-bit floats through float32 (the interpreter
    has no float64 -> bfloat16 conversion; the double rounding is that of the C++ kernels)."""
    if value.dtype == tl.float64 and DTYPE.primitive_bitwidth == 16:
        return value.to(tl.float32).to(DTYPE)
    return value.to(DTYPE)


@triton.jit
def _elementwise_kernel(
    w_ptrs, c_ptrs, out_ptrs,  # int64[T]
    info, meta,
    coeffs,  # acc[T, SLOTS]: OP_GRADS / OP_ADD_GRAD: the Gradient table; OP_PROX: the Prox table
    group_coef,  # acc[groups]: the coefficient of d (grads/add_grad) or the factor (prox) per group
    partials,  # acc[2P]: add_grad's (Σ|d|, Σd²) per FLAT program
    chunk,  # elements per FLAT program
    DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ACC: tl.constexpr, PROMOTE: tl.constexpr,
    OP: tl.constexpr,  # OP_GRADS (out = gradient), OP_ADD_GRAD (out += gradient), OP_PROX (out = w)
    MODE: tl.constexpr, HAS_CENTER: tl.constexpr, ALIGNED: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK: tl.constexpr, RUN_TILE: tl.constexpr, VEC: tl.constexpr, F64: tl.constexpr,
):
    pid, t, x0, x1, y0, slot = _program(meta, MODE, ALIGNED, VEC)
    numel, G, K, L, group_base, nruns, param = _geometry(info, t)
    w = _operand(w_ptrs, t, DTYPE, ALIGNED)
    c = _operand(c_ptrs, t, DTYPE, ALIGNED)
    out = _operand(out_ptrs, t, OUT_DTYPE, ALIGNED)
    if OP == OP_PROX:  # this tensor's row of the Prox table
        row = coeffs + param * PROX_SLOTS
        c1 = tl.load(row + PROX_THRESHOLD).to(ACC)
        second = tl.load(row + PROX_DENOMINATOR).to(ACC)
        nonneg = tl.load(row + PROX_NONNEG).to(ACC)
    else:  # this tensor's row of the Gradient table
        row = coeffs + param * GRADIENT_SLOTS
        c1 = tl.load(row + GRADIENT_L1).to(ACC)
        second = tl.load(row + GRADIENT_L2).to(ACC)
        nonneg = 0.0
    flat_coef = 2 * second  # grads / add_grad: 2·c2 (prox uses `second` as the denominator)
    if MODE == MODE_FLAT:
        lanes = tl.arange(0, BLOCK)
        count = tl.minimum(numel - x0, chunk)
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            offs = x0 + i + lanes
            x = _load_d(w, c, offs, None, ACC, HAS_CENTER, False)
            c_val = tl.load(c + offs).to(ACC) if (HAS_CENTER and OP == OP_PROX) else 0.0
            old = tl.load(out + offs) if OP == OP_ADD_GRAD else 0.0
            tl.store(out + offs, _store_as(_apply(x, flat_coef, c1, second, nonneg, c_val, old, OP, F64, MODE,
                                                  PROMOTE), OUT_DTYPE))
            if REDUCE:
                acc_abs += tl.abs(x)
                acc_sq += x * x
        if full < count:
            rel = full + lanes
            mask = rel < count
            offs = x0 + rel
            x = _load_d(w, c, offs, mask, ACC, HAS_CENTER, True)
            c_val = tl.load(c + offs, mask=mask, other=0.0).to(ACC) if (HAS_CENTER and OP == OP_PROX) else 0.0
            old = tl.load(out + offs, mask=mask, other=0.0) if OP == OP_ADD_GRAD else 0.0
            tl.store(out + offs, _store_as(_apply(x, flat_coef, c1, second, nonneg, c_val, old, OP, F64, MODE,
                                                  PROMOTE), OUT_DTYPE), mask=mask)
            if REDUCE:
                acc_abs += tl.abs(x)
                acc_sq += x * x
        if REDUCE:
            tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
            tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))
    elif MODE == MODE_RUNS:  # one coefficient per run (its group's)
        BG: tl.constexpr = BLOCK // RUN_TILE
        runs = x0 + tl.arange(0, BG).to(tl.int64)
        run_ok = runs < nruns
        group = runs.to(tl.int32) % G.to(tl.int32)  # int32: the host keeps runs below 2**31
        coef = tl.load(group_coef + group_base + group, mask=run_ok, other=0.0).to(ACC)[:, None]
        cols = tl.arange(0, RUN_TILE)
        for k in range(x1, y0, RUN_TILE):
            kk = k + cols
            mask = run_ok[:, None] & (kk < y0)[None, :]
            offs = _row_start(runs, K, ALIGNED, VEC)[:, None] + kk[None, :]
            x = _load_d(w, c, offs, mask, ACC, HAS_CENTER, True)
            c_val = tl.load(c + offs, mask=mask, other=0.0).to(ACC) if (HAS_CENTER and OP == OP_PROX) else 0.0
            old = tl.load(out + offs, mask=mask, other=0.0) if OP == OP_ADD_GRAD else 0.0
            tl.store(out + offs, _store_as(_apply(x, coef, c1, second, nonneg, c_val, old, OP, F64, MODE,
                                                  PROMOTE), OUT_DTYPE), mask=mask)
    else:  # MODE_ROWS: one coefficient per position (its group's), loaded once
        if ALIGNED:
            L = tl.multiple_of(L, VEC)  # so that the mask is constant over each vector
        cols = y0 + tl.arange(0, BLOCK).to(tl.int64)
        col_ok = cols < L
        group = cols.to(tl.int32) // K.to(tl.int32)  # int32: the host keeps rows below 2**31
        coef = tl.load(group_coef + group_base + group, mask=col_ok, other=0.0).to(ACC)
        for a in range(x0, x1):
            offs = _row_start(a, L, ALIGNED, VEC) + cols
            x = _load_d(w, c, offs, col_ok, ACC, HAS_CENTER, True)
            c_val = tl.load(c + offs, mask=col_ok, other=0.0).to(ACC) if (HAS_CENTER and OP == OP_PROX) else 0.0
            old = tl.load(out + offs, mask=col_ok, other=0.0) if OP == OP_ADD_GRAD else 0.0
            tl.store(out + offs, _store_as(_apply(x, coef, c1, second, nonneg, c_val, old, OP, F64, MODE,
                                                  PROMOTE), OUT_DTYPE), mask=col_ok)


# ------------------------------------------------------------------------------------------
# The proximal step in a diagonal metric (the torch backend's _metric_prox is the reference)


@triton.jit
def _metric_row(metric, param, ACC: tl.constexpr):
    """(scale, eps, root, identity, centered) of the tensor whose row of the metric table is
    ``param``; the last three as booleans (each uniform over the tensor: selects, not branches)."""
    row = metric + param * METRIC_SLOTS
    return (tl.load(row + METRIC_SCALE).to(ACC), tl.load(row + METRIC_EPS).to(ACC), tl.load(row + METRIC_ROOT) != 0,
            tl.load(row + METRIC_IDENTITY) != 0, tl.load(row + METRIC_CENTERED) != 0)


@triton.jit
def _divide(x, y, F64: tl.constexpr):
    """x / y rounded to nearest (fp32 '/' is approximate on NVIDIA GPUs; float64's is IEEE)."""
    if F64:
        q = x / y
    else:
        q = tl.math.div_rn(x, y)
    return q


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    """sqrt(x) rounded to nearest (fp32 tl.sqrt is approximate on NVIDIA GPUs; float64's is IEEE)."""
    if F64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _metric_terms(w, c, v, m, offs, mask, t1, c2, nonneg, scale, eps, root, identity, centered,
                  ACC: tl.constexpr, HAS_CENTER: tl.constexpr, MASKED: tl.constexpr, F64: tl.constexpr):
    """(u, a) at ``offs``: with d = w - c and D the metric (``_terms.metric_values``),
    ``u = sign(d)·max(D|d| - t1, 0)`` (``nonneg``: ``max(D·d - t1, 0)``) and ``a = D + c2``.
    ``v`` is not read where ``identity`` (it is then the param itself, maybe of another dtype),
    ``m`` only where ``centered`` and ``root``: masked loads, so nothing else is touched."""
    d = _load_d(w, c, offs, mask, ACC, HAS_CENTER, MASKED)
    if not MASKED:
        mask = tl.full(offs.shape, True, tl.int1)  # uniform: the loads stay vectorised
    # The flags are per tensor: selects of the mask (the interpreter cannot broadcast a scalar
    # boolean into `&`).
    read = tl.where(identity, False, mask)
    x = tl.load(v + offs, mask=read, other=1.0).to(ACC)
    mean = tl.load(m + offs, mask=tl.where(centered & root, read, False), other=0.0).to(ACC)
    # tl.sqrt: IEEE in float64, within an ulp or two in fp32, where the rounded sqrt_rn's slow-path
    # subroutine, one call per element, made ptxas spill (a metric needs no last-bit rounding).
    D = tl.where(identity, 1.0, tl.where(root, tl.sqrt((x - mean * mean) * scale) + eps, x))
    positive = nonneg != 0
    magnitude = tl.where(positive, d, tl.abs(d))
    sign = tl.where(positive, 1.0, _sign(d)).to(ACC)
    u = sign * tl.maximum(D * magnitude - t1, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return u, D + c2


@triton.jit
def _advance(run, k, step_runs, step_k, K):
    """Each lane's (run, offset in the run) BLOCK = step_runs·K + step_k elements further along
    runs of K (``step_k < K`` or ``step_runs = 0``: at most one carry)."""
    k = k + step_k
    carry = k >= K
    return run + step_runs + carry.to(tl.int32), tl.where(carry, k - K, k)


@triton.jit
def _group_terms(w, c, v, m, start, run, k, L, j, n, t1, c2, nonneg, scale, eps, root, identity, centered,
                 ACC: tl.constexpr, HAS_CENTER: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """(u, a, offsets, mask) of the lanes of a group's elements [j, j + BLOCK): each lane's
    element is (run, k) of runs at a stride of L from ``start``; masked past the group's n."""
    mask = j + tl.arange(0, BLOCK) < n
    offs = start + run.to(tl.int64) * L + k
    u, a = _metric_terms(w, c, v, m, offs, mask, t1, c2, nonneg, scale, eps, root, identity, centered, ACC, HAS_CENTER,
                         True, F64)
    return u, a, offs, mask


@triton.jit
def _group_norm(w, c, v, m, start, n, L, K, run0, k0, step_runs, step_k, mu, shift, t1, c2, nonneg, scale, eps,
                root, identity, centered, ACC: tl.constexpr, HAS_CENTER: tl.constexpr, F64: tl.constexpr,
                BLOCK: tl.constexpr):
    """One pass over a group: ``f = ‖u/((a − shift) + μ)‖`` and its derivative
    ``df/dμ = -Σu²/((a − shift) + μ)³ / f`` (0 for ``f = 0``), summed in the acc dtype. A zero
    ``u`` (masked lanes too) adds 0 whatever its divisor is (0 in a lower bound's hard case)."""
    run, k = run0, k0
    sq = tl.zeros([BLOCK], dtype=ACC)
    cube = tl.zeros([BLOCK], dtype=ACC)
    for j in range(0, n, BLOCK):
        u, a, _offs, _mask = _group_terms(w, c, v, m, start, run, k, L, j, n, t1, c2, nonneg, scale, eps, root,
                                          identity, centered, ACC, HAS_CENTER, F64, BLOCK)
        inverse = 1.0 / tl.where(u == 0, 1.0, (a - shift) + mu)  # (r = 0 for u = 0 whatever the divisor)
        r = u * inverse
        sq += r * r
        cube += r * r * inverse
        run, k = _advance(run, k, step_runs, step_k, K)
    f = _sqrt(tl.sum(sq, axis=0), F64)
    return f, -tl.sum(cube, axis=0) / tl.where(f > 0, f, 1.0)


@triton.jit
def _group_root(w, c, v, m, start, n, L, K, run0, k0, step_runs, step_k, lower, upper, target, shift, t1, c2,
                nonneg, scale, eps, root, identity, centered, ROOT: tl.constexpr, ACC: tl.constexpr,
                HAS_CENTER: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """The μ in [lower, upper] where the equation ROOT holds with ``target`` (ROOT_GROUP:
    ``μ·f(μ) = target``, the group threshold; ROOT_MAX_NORM: ``f(μ) = target``; ROOT_MIN_NORM:
    ``1/f(μ) = target``, with ``shift`` = min a), f the group's ``_group_norm``: each
    increasing in μ. As ``_terms._newton``: Newton steps that stay inside the bracket, bisection
    otherwise, one pass over the group each, until μ no longer moves (at most NEWTON_STEPS)."""
    if F64:
        tol = NEWTON_TOL_F64
    else:
        tol = NEWTON_TOL_F32
    mu = (lower + upper) / 2
    moving = lower <= upper  # (false for a NaN bracket: nothing to find)
    for _ in range(NEWTON_STEPS):
        if moving:
            f, slope_f = _group_norm(w, c, v, m, start, n, L, K, run0, k0, step_runs, step_k, mu, shift, t1, c2,
                                     nonneg, scale, eps, root, identity, centered, ACC, HAS_CENTER, F64, BLOCK)
            if ROOT == ROOT_MAX_NORM:
                value = target - f
                slope = -slope_f
            elif ROOT == ROOT_MIN_NORM:  # (target: 1/lo; one division per pass)
                inverse_f = 1.0 / f
                value = inverse_f - target
                slope = -slope_f * inverse_f * inverse_f
            else:
                value = mu * f - target
                slope = f + mu * slope_f
            lower = tl.where(value < 0, mu, lower)
            upper = tl.where(value > 0, mu, upper)
            step = mu - value / tl.where(slope > 0, slope, 1.0)
            inside = (step > lower) & (step < upper) & (slope > 0)
            new = tl.where(inside, step, (lower + upper) / 2)
            moving = tl.abs(new - mu) > tol * tl.abs(new)
            mu = new
    return mu


@triton.jit
def _metric_prox_kernel(
    w_ptrs, c_ptrs, v_ptrs, m_ptrs,  # int64[T]: data pointers (v, m: the metric tensors, in w's memory order)
    info,  # int64[7T]: per-tensor geometry
    meta,  # MODE_FLAT: int64[5P], per-program (tensor, x0, x1, y0, slot); MODE_GROUP: the group -> param index
    tensor_of,  # int64[params]: each param's row of info (-1: empty); MODE_GROUP only
    coeffs,  # acc[params, PROX_SLOTS]: the Prox table
    metric,  # acc[params, METRIC_SLOTS]: the metric table
    chunk,  # elements per FLAT program
    DTYPE: tl.constexpr, V_DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, HAS_CENTER: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, F64: tl.constexpr,
):
    """w = c + x, x the proximal step in the diagonal metric of each tensor (see "The step in a
    diagonal metric"): MODE_FLAT, ``x = u/a`` per element; MODE_GROUP, one group per program."""
    if MODE == MODE_FLAT:
        pid, t, x0, _x1, _y0, _slot = _program(meta, MODE, ALIGNED, VEC)
        param = tl.load(info + 7 * t + 6)
    else:
        pid = tl.program_id(0).to(tl.int64)
        param = tl.load(meta + pid)
        t = tl.load(tensor_of + param)
    if t >= 0:  # (a group of an empty tensor: nothing to do)
        numel, G, K, L, group_base, nruns, _ = _geometry(info, t)
        w = _operand(w_ptrs, t, DTYPE, ALIGNED)
        c = _operand(c_ptrs, t, DTYPE, ALIGNED)
        v = _operand(v_ptrs, t, V_DTYPE, ALIGNED)
        m = _operand(m_ptrs, t, V_DTYPE, ALIGNED)
        row = coeffs + param * PROX_SLOTS
        t1 = tl.load(row + PROX_THRESHOLD).to(ACC)
        c2 = tl.load(row + PROX_DENOMINATOR).to(ACC)  # the launcher hands 2·lr·l2 here (DENOMINATOR − 1, in float64)
        nonneg = tl.load(row + PROX_NONNEG).to(ACC)
        scale, eps, root, identity, centered = _metric_row(metric, param, ACC)
        lanes = tl.arange(0, BLOCK)
        if MODE == MODE_FLAT:  # elements [x0, x0 + chunk): x = u / a
            count = tl.minimum(numel - x0, chunk)
            full = count - count % BLOCK
            for i in range(0, full, BLOCK):
                offs = x0 + i + lanes
                u, a = _metric_terms(w, c, v, m, offs, None, t1, c2, nonneg, scale, eps, root, identity, centered,
                                     ACC, HAS_CENTER, False, F64)
                x = _divide(u, a, F64)
                if HAS_CENTER:
                    x += tl.load(c + offs).to(ACC)
                tl.store(w + offs, _store_as(x, DTYPE))
            if full < count:
                rel = full + lanes
                mask = rel < count
                offs = x0 + rel
                u, a = _metric_terms(w, c, v, m, offs, mask, t1, c2, nonneg, scale, eps, root, identity, centered,
                                     ACC, HAS_CENTER, True, F64)
                x = _divide(u, a, F64)
                if HAS_CENTER:
                    x += tl.load(c + offs, mask=mask, other=0.0).to(ACC)
                tl.store(w + offs, _store_as(x, DTYPE), mask=mask)
        else:  # MODE_GROUP: group g = pid - group_base, A runs of K at g·K + [0, A)·L, n = A·K elements
            A = nruns.to(tl.int32) // G.to(tl.int32)  # (int64 division is a slow subroutine call)
            start = (pid - group_base) * K
            n = A.to(tl.int64) * K
            t3 = tl.load(row + PROX_GROUP_THRESHOLD).to(ACC)
            lo = tl.load(row + PROX_MIN_NORM).to(ACC)
            hi = tl.load(row + PROX_MAX_NORM).to(ACC)
            # Walked as runs of KW at a stride of LW, each lane's run and offset in int32: one run
            # (A = 1, up to 2**31 elements) as runs of BLOCK; else the runs themselves, whose K
            # is below 2**30 (the host keeps L = G·K below 2**31, and A > 1 means G >= 2).
            single = A == 1
            KW = tl.where(single, BLOCK, K.to(tl.int32))
            LW = tl.where(single, BLOCK, L)
            run0 = lanes // KW  # each lane's first (run, offset in it): one division per lane
            k0 = lanes % KW
            step_runs = BLOCK // KW
            step_k = BLOCK % KW
            # Pass 1: ‖u‖², and the bracket's ends min a, max a (over every element, as the reference).
            run, k = run0, k0
            sq = tl.zeros([BLOCK], dtype=ACC)
            a_min = tl.full([BLOCK], float("inf"), ACC)
            a_max = tl.full([BLOCK], float("-inf"), ACC)
            for j in range(0, n, BLOCK):
                u, a, _offs, mask = _group_terms(w, c, v, m, start, run, k, LW, j, n, t1, c2, nonneg, scale, eps,
                                                 root, identity, centered, ACC, HAS_CENTER, F64, BLOCK)
                sq += u * u
                a_min = tl.minimum(a_min, tl.where(mask, a, float("inf")))
                a_max = tl.maximum(a_max, tl.where(mask, a, float("-inf")))
                run, k = _advance(run, k, step_runs, step_k, KW)
            norm_u = _sqrt(tl.sum(sq, axis=0), F64)
            low_a = tl.min(a_min, axis=0)
            high_a = tl.max(a_max, axis=0)
            zero = norm_u <= t3  # the group is exactly zero (unless a lower bound holds it)
            mu = tl.zeros([], dtype=ACC)
            shift = tl.zeros([], dtype=ACC)  # min a for a group held at the lower bound (μ is then σ)
            spread = tl.zeros([], dtype=ACC)  # the lower bound's hard case: the value where a = min a
            if not zero:
                if t3 > 0:  # μ·f(μ) = t3 on [t3·a_min/(‖u‖ − t3), t3·a_max/(‖u‖ − t3)]
                    gap = norm_u - t3
                    mu = _group_root(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, t3 * low_a / gap,
                                     t3 * high_a / gap, t3, shift, t1, c2, nonneg, scale, eps, root, identity,
                                     centered, ROOT_GROUP, ACC, HAS_CENTER, F64, BLOCK)
                if hi < float("inf"):
                    f, _slope = _group_norm(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, mu, shift, t1,
                                            c2, nonneg, scale, eps, root, identity, centered, ACC, HAS_CENTER, F64,
                                            BLOCK)
                    if f > hi:  # f(μ) = h on [max(μ, ‖u‖/h − a_max), ‖u‖/h − a_min]
                        lower = tl.maximum(mu, norm_u / hi - high_a)
                        upper = tl.maximum(lower, norm_u / hi - low_a)
                        mu = _group_root(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, lower, upper, hi,
                                         shift, t1, c2, nonneg, scale, eps, root, identity, centered, ROOT_MAX_NORM,
                                         ACC, HAS_CENTER, F64, BLOCK)
            if (lo > 0) & (norm_u > 0):  # (with lo > 0 the plan allows neither L1 nor nonneg: u = D·y)
                f = tl.zeros([], dtype=ACC)
                if not zero:
                    f, _slope = _group_norm(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, mu, shift, t1,
                                            c2, nonneg, scale, eps, root, identity, centered, ACC, HAS_CENTER, F64,
                                            BLOCK)
                if zero | (f < lo):  # held at the bound: solved and written in σ = λ + min a
                    # The hard case's figures: u's mass where a = min a and their count (a pass), and
                    # f's limit at σ = 0 (finite when that mass is 0: _group_norm skips a zero u).
                    run, k = run0, k0
                    mass = tl.zeros([], dtype=ACC)
                    count = tl.zeros([], dtype=ACC)
                    for j in range(0, n, BLOCK):
                        u, a, _offs, mask = _group_terms(w, c, v, m, start, run, k, LW, j, n, t1, c2, nonneg, scale,
                                                         eps, root, identity, centered, ACC, HAS_CENTER, F64, BLOCK)
                        at_min = mask & (a == low_a)
                        mass += tl.sum(tl.where(at_min, u * u, 0.0), axis=0)
                        count += tl.sum(tl.where(at_min, 1.0, 0.0), axis=0)
                        run, k = _advance(run, k, step_runs, step_k, KW)
                    shift = low_a
                    limit = lo
                    if mass == 0:
                        limit, _slope = _group_norm(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, 0.0,
                                                    shift, t1, c2, nonneg, scale, eps, root, identity, centered, ACC,
                                                    HAS_CENTER, F64, BLOCK)
                    if (mass == 0) & (limit <= lo):  # hard: σ = 0, the rest of the norm spread
                        mu = tl.zeros([], dtype=ACC)
                        spread = _sqrt(tl.maximum(lo * lo - limit * limit, 0.0) / count, F64)
                    else:  # 1/f(σ) = 1/lo on [max(0, ‖u‖/lo − (a_max − a_min)), min(μ + a_min, ‖u‖/lo)]
                        lower = tl.maximum(norm_u / lo - (high_a - low_a), 0.0)
                        upper = norm_u / lo
                        if not zero:
                            upper = tl.minimum(upper, mu + low_a)
                        mu = _group_root(w, c, v, m, start, n, LW, KW, run0, k0, step_runs, step_k, lower, upper,
                                         1.0 / lo, shift, t1, c2, nonneg, scale, eps, root, identity, centered, ROOT_MIN_NORM,
                                         ACC, HAS_CENTER, F64, BLOCK)
                    zero = norm_u <= 0  # (false: the bound holds this group; a tensor, as the branch needs)
            # The write: x = u / ((a − shift) + μ) (the spread where that is 0), or 0 for a zero group.
            run, k = run0, k0
            for j in range(0, n, BLOCK):
                u, a, offs, mask = _group_terms(w, c, v, m, start, run, k, LW, j, n, t1, c2, nonneg, scale, eps, root,
                                                identity, centered, ACC, HAS_CENTER, F64, BLOCK)
                q = (a - shift) + mu
                x = tl.where(zero, 0.0, tl.where(q == 0, spread, _divide(u, tl.where(q == 0, 1.0, q), F64)))
                if HAS_CENTER:
                    x += tl.load(c + offs, mask=mask, other=0.0).to(ACC)
                tl.store(w + offs, _store_as(x, DTYPE), mask=mask)
                run, k = _advance(run, k, step_runs, step_k, KW)


_TL_DTYPES = {  # torch dtype -> the kernels' DTYPE / ACC / OUT_DTYPE / PROMOTE constexprs
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
