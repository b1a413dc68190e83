"""The Triton backend: multi-tensor CUDA kernels for every fastreg term, a few launches per call.

Design (see DESIGN.md §3 and fastreg/backends/__init__.py for the contract):

* **Programs.** Every tensor of a call is cut into programs (CUDA blocks) of about ``chunk``
  elements, in one of three modes, chosen per tensor:

  ``FLAT``  a tensor without a group term: a contiguous chunk, walked in ``BLOCK`` tiles,
            all but the last unmasked (vectorised loads).
  ``RUNS``  a tensor whose groups are runs of ``K >= MIN_RUN`` contiguous elements
            (``group_dim=0`` on a contiguous weight): a ``[BLOCK // RUN_TILE, RUN_TILE]``
            tile of whole runs (rows) walked along ``K``; one partial per run.
  ``ROWS``  a tensor whose runs are short (``group_dim=1`` on a Linear weight: ``K = 1``): a
            ``BLOCK``-wide window of positions of its ``(A, G*K)`` memory view, walked down
            ``chunk // BLOCK`` rows; one float64 partial per position.

  A program's tensor, its range and its partials' slot come from a per-program row of an
  int64 device table; the tensor's pointers (one table per operand, cast to the dtype with
  ``tl.pointer_type``: the pattern of Triton's grouped-GEMM tutorial) and geometry from
  per-tensor rows. There is no limit on tensors per launch; one launch per (mode, alignment)
  present in the call.
* **Chunk per launch.** ``chunk`` is the smallest power of two (between ``BLOCK`` and
  ``MAX_CHUNK``) that cuts the call into at most ``TARGET_PROGRAMS`` programs: a 2M-parameter
  model gets 512 programs of 4096 elements instead of 32 of 65536, so a 132-SM GPU is full. It
  is a function of the tensor sizes only, so the results stay bitwise deterministic.
* **Alignment per tensor.** A tensor whose operands all start on 16 bytes (and, with groups,
  whose rows keep that alignment) goes into the ``ALIGNED`` launch, with
  ``tl.multiple_of`` hints: 128-bit loads. One odd tensor no longer turns them off for all.
* **64-bit offsets.** ``tl.program_id(0)`` is widened to int64 first; table entries are int64,
  so offsets and masks are int64: tensors above 2**31 elements are fine.
* **Deterministic sums, no atomics.** Stage 1 writes one ``[Σ|s|, Σs²]`` pair per program and
  the group partials into their own slots; ``_group_sq_kernel`` adds each group's slots in a
  fixed order in float64, and ``_finish_kernel`` adds the pairs and ``Σ_g sqrt(group_sq)``.
* **Coefficients** are loaded inside the kernels from device tensors, and the per-group
  coefficients are formed on the device (``group_coef``): no ``.item()``, no host sync, so a
  step can be CUDA-graph captured (after a warm-up call has filled the plan cache).
* **Floating-point fusion** is set explicitly on every launch: ``enable_fp_fusion=True``
  (``a * b + c`` is one FMA, rounded once, as in the C++ kernels), so a change of Triton's
  default (off from Triton 3.10) changes no result.
* **Call plans and their cache.** Building a call's tables is a host loop plus one
  host-to-device copy, so plans are cached (LRU) keyed by the operands' pointers, shapes and
  strides, the group dim, the tuning constants and the current stream. Keying by stream
  orders a plan's upload before every use (same stream), so a cached table is never read on
  another stream before its copy has landed. A plan built while a CUDA graph is captured
  goes into a separate list kept alive with the graph, never into the shared cache: its
  upload only happens when the graph replays, so an eager call must not find it.
* **Layouts.** Kernels walk memory linearly. A tensor that is dense (contiguous in some
  dimension order, e.g. ``w.t()`` or channels_last) is used as is, its groups located from its
  strides; centers and gradients in another order, and non-dense tensors, are read through a
  copy in the parameter's order, and in-place results on a copy are copied back explicitly.
* **Host time per call** (what a call costs the training loop's thread while the GPU works;
  ``python -m bench.host_overhead`` measures it with the kernels stubbed): a cache hit reads each
  tensor's pointer and shape (C-level maps), the write targets' pointer table is cached too, and
  constant kernel arguments are cached device tensors. ``grads`` must return one fresh tensor per
  parameter (148 ``empty_like`` are most of its ~1 ms for GPT-2 shapes on this host); the eager
  ``loss.backward()`` path avoids it by adding into ``p.grad`` directly (``fastreg._ops``).

Tuning constants are module-level and read at every call, so tests can shrink them and the
GPU check can sweep them (``BLOCK``, ``BLOCK_FP64``, ``NUM_WARPS``, ``MAX_CHUNK``,
``TARGET_PROGRAMS``, ``RUN_TILE``). Not measured on a GPU yet: ``python -m bench.gpu_check``
sweeps them on the first GPU it runs on.
"""

import contextlib
import math
import os
from collections import OrderedDict

import torch

from fastreg.backends._geometry import acc_dtype, group_sizes, has_groups, memory_geometry

NAME = "triton"

# Tuning knobs (read at call time; see the module docstring).
BLOCK = 2048  # elements per tile for 2- and 4-byte dtypes (a power of two)
BLOCK_FP64 = 1024  # elements per tile for float64
NUM_WARPS = 8
MAX_CHUNK = 65536  # largest program (elements); a multiple of every tile
TARGET_PROGRAMS = 1024  # the chunk is the smallest power of two giving at most this many programs
RUN_TILE = 256  # RUNS mode: tile width along a run (BLOCK // RUN_TILE runs per tile)
RUN_LONG = 8  # runs of at least RUN_LONG * BLOCK elements (few, long groups) use a [1, BLOCK] tile
MIN_RUN = 64  # runs at least this long use RUNS mode, shorter ones ROWS
FINISH_BLOCK = 1024  # stage-2 tile (partial pairs per iteration)
FINISH_WARPS = 4
GROUP_BLOCK = 256  # groups per _group_sq_kernel program
CACHE_SIZE = 32  # call plans kept (LRU)
ALIGN_BYTES = 16
ENABLE_FP_FUSION = True

FLAT, RUNS, ROWS = 0, 1, 2
SUMS, GRADS, ADD_GRAD, PROX = "sums", "grads", "add_grad", "prox"
TENSOR_FIELDS = 6  # per tensor: (numel, G, K, L = G*K, group base, runs = numel / K)
INT32_MAX = 2**31 - 1  # group indices are computed in int32 (int64 division is a slow subroutine call)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Under TRITON_INTERPRET=1 kernels run on the host and read raw host addresses, so only CPU
# tensors can work (the interpreter copies CUDA tensor arguments to the host, but not the
# memory the device tables point at): the backend then runs on "cpu" only.
_INTERPRET = _interpreting()
DEVICE_TYPES = ("cpu",) if _INTERPRET else ("cuda",)

try:  # the module must import without triton: the backend is then unavailable
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None


def unavailable_reason():
    if triton is None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    if _INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

if triton is not None:

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
            if MODE == 0:
                x0 = tl.multiple_of(x0, VEC)
            elif MODE == 1:
                x1 = tl.multiple_of(x1, VEC)
                y0 = tl.multiple_of(y0, VEC)
            else:
                y0 = tl.multiple_of(y0, VEC)
        return pid, tl.load(row), x0, x1, y0, tl.load(row + 4)

    @triton.jit
    def _geometry(info, t):
        """Tensor ``t``'s (numel, G, K, L, group base, runs)."""
        row = info + 6 * t
        return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
                tl.load(row + 5))

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
    def _magnitude(x, threshold, SHRINK: tl.constexpr):
        """|s|: |d|, or max(|d| - threshold, 0) (NaN propagates)."""
        if SHRINK:
            return tl.maximum(tl.abs(x) - threshold, 0.0, propagate_nan=tl.PropagateNan.ALL)
        return tl.abs(x)

    @triton.jit
    def _sums_kernel(
        w_ptrs, c_ptrs,  # int64[T]: data pointers (c_ptrs = w_ptrs without centers)
        info,  # int64[5T]: per-tensor geometry
        meta,  # int64[5P]: per-program (tensor, x0, x1, y0, slot)
        partials,  # acc[2P]: (Σ|s|, Σs²) per program
        slots,  # acc[...]: group partials
        threshold,  # acc[1]
        chunk,  # elements per FLAT program (a runtime value: one compiled kernel for every chunk)
        DTYPE: tl.constexpr, ACC: tl.constexpr, MODE: tl.constexpr, HAS_CENTER: tl.constexpr,
        SHRINK: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RUN_TILE: tl.constexpr,
        VEC: tl.constexpr,
    ):
        pid, t, x0, x1, y0, slot = _program(meta, MODE, ALIGNED, VEC)
        numel, G, K, L, group_base, nruns = _geometry(info, t)
        w = _operand(w_ptrs, t, DTYPE, ALIGNED)
        c = _operand(c_ptrs, t, DTYPE, ALIGNED)
        thr = tl.load(threshold).to(ACC)
        if MODE == 0:  # FLAT: elements [x0, x0 + chunk) of the tensor
            lanes = tl.arange(0, BLOCK)
            count = tl.minimum(numel - x0, chunk)
            acc_abs = tl.zeros([BLOCK], dtype=ACC)
            acc_sq = tl.zeros([BLOCK], dtype=ACC)
            full = count - count % BLOCK
            for i in range(0, full, BLOCK):
                s = _magnitude(_load_d(w, c, x0 + i + lanes, None, ACC, HAS_CENTER, False), thr, SHRINK)
                acc_abs += s
                acc_sq += s * s
            if full < count:
                offs = full + lanes
                s = _magnitude(_load_d(w, c, x0 + offs, offs < count, ACC, HAS_CENTER, True), thr, SHRINK)
                acc_abs += s
                acc_sq += s * s
            tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
            tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))
        elif MODE == 1:  # RUNS: runs [x0, x0 + BG) (a run: K elements), along k in [x1, y0)
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
                s = _magnitude(_load_d(w, c, offs, mask, ACC, HAS_CENTER, True), thr, SHRINK)
                acc_abs += s
                acc_sq += s * s
            tl.store(partials + 2 * pid, tl.sum(tl.sum(acc_abs, axis=1), axis=0))
            per_run = tl.sum(acc_sq, axis=1)
            tl.store(partials + 2 * pid + 1, tl.sum(per_run, axis=0))
            tl.store(slots + slot + tl.arange(0, BG), per_run, mask=run_ok)
        else:  # ROWS: positions [y0, y0 + BLOCK) of rows [x0, x1)
            if ALIGNED:
                L = tl.multiple_of(L, VEC)  # so that the mask is constant over each vector
            cols = y0 + tl.arange(0, BLOCK).to(tl.int64)
            col_ok = cols < L
            acc_abs = tl.zeros([BLOCK], dtype=ACC)
            acc_sq = tl.zeros([BLOCK], dtype=tl.float64)  # one column's squares over many rows
            for a in range(x0, x1):
                offs = _row_start(a, L, ALIGNED, VEC) + cols
                s = _magnitude(_load_d(w, c, offs, col_ok, ACC, HAS_CENTER, True), thr, SHRINK)
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
    def _finish_kernel(partials, nparts, group_sq, ngroups, out, BLOCK: tl.constexpr):
        """out = [Σ|s|, Σs², Σ_g sqrt(group_sq)]: one program, fixed order, float64."""
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        acc_abs = tl.zeros([BLOCK], dtype=tl.float64)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float64)
        acc_norm = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, nparts, BLOCK):
            offs = i + lanes
            mask = offs < nparts
            acc_abs += tl.load(partials + 2 * offs, mask=mask, other=0.0).to(tl.float64)
            acc_sq += tl.load(partials + 2 * offs + 1, mask=mask, other=0.0).to(tl.float64)
        for i in range(0, ngroups, BLOCK):
            offs = i + lanes
            acc_norm += tl.sqrt(tl.load(group_sq + offs, mask=offs < ngroups, other=0.0).to(tl.float64))
        tl.store(out, tl.sum(acc_abs, axis=0).to(out.dtype.element_ty))
        tl.store(out + 1, tl.sum(acc_sq, axis=0).to(out.dtype.element_ty))
        tl.store(out + 2, tl.sum(acc_norm, axis=0).to(out.dtype.element_ty))

    @triton.jit
    def _apply(x, coef, c1, den, c_val, old, OP: tl.constexpr, F64: tl.constexpr, FLAT: tl.constexpr,
               PROMOTE: tl.constexpr):
        """The element-wise result of op OP for d = x (see ``_elementwise_kernel``); one return."""
        if OP == 2:  # prox: c + shrunk / den (FLAT) or c + shrunk * factor (groups)
            shrunk = _sign(x) * tl.maximum(tl.abs(x) - c1, 0.0, propagate_nan=tl.PropagateNan.ALL)
            if FLAT:
                if F64:
                    r = shrunk / den
                else:
                    r = tl.math.div_rn(shrunk, den)  # fp32 '/' is approximate on NVIDIA GPUs
            else:
                r = shrunk * coef
            value = (r + c_val).to(PROMOTE)
        else:
            gradient = c1 * _sign(x) + coef * x  # one FMA with fusion on: rounded once
            if OP == 1:  # add_grad: old + gradient in the wider dtype
                value = old.to(PROMOTE) + gradient.to(PROMOTE)
            else:
                value = gradient.to(PROMOTE)
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
        coeffs,  # acc[3]: grads/add_grad (c1, c2, -); prox (threshold, denominator, -)
        group_coef,  # acc[groups]: the coefficient of d (grads/add_grad) or the factor (prox) per group
        partials,  # acc[2P]: add_grad's (Σ|d|, Σd²) per FLAT program
        chunk,  # elements per FLAT program
        DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ACC: tl.constexpr, PROMOTE: tl.constexpr,
        OP: tl.constexpr,  # 0 grads (out = gradient), 1 add_grad (out += gradient), 2 prox (out = w)
        MODE: tl.constexpr, HAS_CENTER: tl.constexpr, ALIGNED: tl.constexpr, REDUCE: tl.constexpr,
        BLOCK: tl.constexpr, RUN_TILE: tl.constexpr, VEC: tl.constexpr, F64: tl.constexpr,
    ):
        pid, t, x0, x1, y0, slot = _program(meta, MODE, ALIGNED, VEC)
        numel, G, K, L, group_base, nruns = _geometry(info, t)
        w = _operand(w_ptrs, t, DTYPE, ALIGNED)
        c = _operand(c_ptrs, t, DTYPE, ALIGNED)
        out = _operand(out_ptrs, t, OUT_DTYPE, ALIGNED)
        c1 = tl.load(coeffs).to(ACC)
        second = tl.load(coeffs + 1).to(ACC)
        flat_coef = 2 * second  # grads / add_grad: 2·c2 (prox uses `second` as the denominator)
        if MODE == 0:  # FLAT
            lanes = tl.arange(0, BLOCK)
            count = tl.minimum(numel - x0, chunk)
            acc_abs = tl.zeros([BLOCK], dtype=ACC)
            acc_sq = tl.zeros([BLOCK], dtype=ACC)
            full = count - count % BLOCK
            for i in range(0, full, BLOCK):
                offs = x0 + i + lanes
                x = _load_d(w, c, offs, None, ACC, HAS_CENTER, False)
                c_val = tl.load(c + offs).to(ACC) if (HAS_CENTER and OP == 2) else 0.0
                old = tl.load(out + offs) if OP == 1 else 0.0
                tl.store(out + offs, _store_as(_apply(x, flat_coef, c1, second, c_val, old, OP, F64, True,
                                            PROMOTE), OUT_DTYPE))
                if REDUCE:
                    acc_abs += tl.abs(x)
                    acc_sq += x * x
            if full < count:
                rel = full + lanes
                mask = rel < count
                offs = x0 + rel
                x = _load_d(w, c, offs, mask, ACC, HAS_CENTER, True)
                c_val = tl.load(c + offs, mask=mask, other=0.0).to(ACC) if (HAS_CENTER and OP == 2) else 0.0
                old = tl.load(out + offs, mask=mask, other=0.0) if OP == 1 else 0.0
                tl.store(out + offs, _store_as(_apply(x, flat_coef, c1, second, c_val, old, OP, F64, True,
                                            PROMOTE), OUT_DTYPE), mask=mask)
                if REDUCE:
                    acc_abs += tl.abs(x)
                    acc_sq += x * x
            if REDUCE:
                tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
                tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))
        elif MODE == 1:  # RUNS: one coefficient per run (its group's)
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
                c_val = tl.load(c + offs, mask=mask, other=0.0).to(ACC) if (HAS_CENTER and OP == 2) else 0.0
                old = tl.load(out + offs, mask=mask, other=0.0) if OP == 1 else 0.0
                tl.store(out + offs, _store_as(_apply(x, coef, c1, second, c_val, old, OP, F64, False,
                                            PROMOTE), OUT_DTYPE), mask=mask)
        else:  # ROWS: one coefficient per position (its group's), loaded once
            if ALIGNED:
                L = tl.multiple_of(L, VEC)  # so that the mask is constant over each vector
            cols = y0 + tl.arange(0, BLOCK).to(tl.int64)
            col_ok = cols < L
            group = cols.to(tl.int32) // K.to(tl.int32)  # int32: the host keeps rows below 2**31
            coef = tl.load(group_coef + group_base + group, mask=col_ok, other=0.0).to(ACC)
            for a in range(x0, x1):
                offs = _row_start(a, L, ALIGNED, VEC) + cols
                x = _load_d(w, c, offs, col_ok, ACC, HAS_CENTER, True)
                c_val = tl.load(c + offs, mask=col_ok, other=0.0).to(ACC) if (HAS_CENTER and OP == 2) else 0.0
                old = tl.load(out + offs, mask=col_ok, other=0.0) if OP == 1 else 0.0
                tl.store(out + offs, _store_as(_apply(x, coef, c1, second, c_val, old, OP, F64, False,
                                            PROMOTE), OUT_DTYPE), mask=col_ok)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }


# --------------------------------------------------------------------------------------
# Plans: the device tables of a (params, centers) set, and their cache
# --------------------------------------------------------------------------------------

class _Launch:
    """One kernel launch: a mode, a tile width, an alignment, its programs' table rows."""

    __slots__ = ("mode", "run_tile", "aligned", "meta", "programs", "partial_base")

    def __init__(self, mode, run_tile, aligned, meta, programs, partial_base):
        self.mode, self.run_tile, self.aligned = mode, run_tile, aligned
        self.meta, self.programs, self.partial_base = meta, programs, partial_base


class _Plan:
    """Everything the kernels need about a set of tensors: one int64 device tensor holding the
    pointer tables of w and c, the per-tensor geometry, the per-program rows of every launch
    and the group-reduction rows; plus the launches and buffer sizes."""

    __slots__ = ("data", "host", "w_ptrs", "c_ptrs", "info", "launches", "ginfo", "gmap", "group_programs",
                 "programs", "nslots", "ngroups", "chunk", "grouped", "has_center", "dtype", "device",
                 "direct", "reads", "copies", "index", "strides")


_plans = OrderedDict()  # key -> _Plan
_targets = OrderedDict()  # key -> (device table of target pointers, pinned staging buffer)
_graph_plans = []  # plans and tables built during CUDA-graph capture: kept with the graph, never shared
_stats = {"builds": 0, "hits": 0, "target_builds": 0, "target_hits": 0}


def cache_info():
    """Counters of plan builds and cache hits (for tests and benchmarks)."""
    return dict(_stats, size=len(_plans), target_size=len(_targets), graph_plans=len(_graph_plans))


def cache_clear():
    _plans.clear()
    _targets.clear()
    for k in _stats:
        _stats[k] = 0


def _stream_key(device):
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _upload(values, device):
    """An int64 device tensor holding ``values`` (a CPU int64 tensor), without a host sync."""
    if device.type != "cuda":
        return values, values
    # A pageable host-to-device copy synchronises the stream; a pinned non_blocking one does
    # not. The owner keeps the pinned staging buffer alive (a graph-captured copy replays it).
    host = values.pin_memory()
    return host.to(device, non_blocking=True), host


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(cache, limit, key, build, device, hit, miss):
    """``cache[key]``, built on a miss; during CUDA-graph capture a miss is kept aside."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
        _stats[hit] += 1
        return value
    value = build()
    _stats[miss] += 1
    if _capturing(device):  # its upload only happens when the graph replays: never share it
        _graph_plans.append(value)
        return value
    cache[key] = value
    while len(cache) > limit:
        cache.popitem(last=False)
    return value


def _chunk(total, block):
    """The program size for a call of ``total`` elements: see the module docstring."""
    want = max(1, -(-total // TARGET_PROGRAMS))
    chunk = 1 << (want - 1).bit_length()
    return max(block, min(MAX_CHUNK, chunk))


def _vector(dtype):
    """Elements per 16 bytes."""
    return ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()


def _block(dtype):
    return BLOCK_FP64 if dtype == torch.float64 else BLOCK


def _is_dense(t):
    """True when ``t``'s elements fill ``t.numel()`` consecutive slots from ``t.data_ptr()``."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def _same_order(a, b):
    """Two dense tensors of one shape map every index to the same memory offset."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _signature(tensors):
    """What a plan depends on, cheaply: every data pointer and shape (C-level maps: ~0.3 µs a
    tensor). Strides matter only to tensors with groups: a hit checks theirs (``_plan``)."""
    return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(torch.Tensor.size, tensors))


def _plan(params, centers, group_dim, misaligned=()):
    """The plan for ``params`` (and ``centers``), from the cache when every tensor is where it
    was; ``misaligned``: indices whose write target is not 16-byte aligned."""
    device, dtype = params[0].device, params[0].dtype
    key = (device, dtype, _stream_key(device), group_dim, misaligned, BLOCK, BLOCK_FP64, MAX_CHUNK,
           TARGET_PROGRAMS, RUN_TILE, MIN_RUN, RUN_LONG, GROUP_BLOCK, _signature(params),
           None if centers is None else _signature(centers))
    plan = _plans.get(key)
    if plan is not None and all(params[i].stride() == stride for i, stride in plan.strides):
        _plans.move_to_end(key)
        _stats["hits"] += 1
        return plan
    plan = _build_plan(params, centers, group_dim, misaligned)
    _stats["builds"] += 1
    if _capturing(device):
        _graph_plans.append(plan)
    elif plan.direct:  # a plan reading copies is valid for this call only
        _plans[key] = plan
        while len(_plans) > CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _build_plan(params, centers, group_dim, misaligned):
    dtype, device = params[0].dtype, params[0].device
    block = _block(dtype)
    sizes = group_sizes(params, group_dim)
    records, base, direct = [], 0, True
    for i, p in enumerate(params):
        group_base, base = base, base + sizes[i]
        if not p.numel():
            continue
        w = p if _is_dense(p) else p.contiguous()
        c = None
        if centers is not None:
            c = centers[i]
            if not (_is_dense(c) and _same_order(c, w)):
                c = torch.empty_like(w).copy_(c)  # in w's memory order
                direct = False
        direct = direct and w is p
        grouped = has_groups(p, group_dim)
        A, G, K = memory_geometry(w, group_dim) if grouped else (1, 1, p.numel())
        mode = FLAT if not grouped else (RUNS if K >= MIN_RUN or G == 1 else ROWS)
        run_tile = block if K >= RUN_LONG * block else min(RUN_TILE, block)
        operands = (w,) if c is None else (w, c)
        aligned = i not in misaligned and _aligned(operands, mode, (A, G, K))
        records.append((i, p, w, c, mode, run_tile, (A, G, K), group_base, aligned))

    total = sum(r[1].numel() for r in records)
    chunk = _chunk(total, block)
    tensors, by_launch, ginfo, gmap, nslots = [], {}, [], [], 0
    for t, (_, p, _, _, mode, run_tile, (A, G, K), group_base, aligned) in enumerate(records):
        numel, L = p.numel(), G * K
        if mode != FLAT and max(A * G, L) > INT32_MAX:
            raise NotImplementedError(f"fastreg triton backend: a tensor of shape {tuple(p.shape)} has more than 2**31 "
                                      "runs or a row longer than 2**31 elements along its group dimension")
        tensors += [numel, G, K, L, group_base, A * G]
        rows = by_launch.setdefault((mode, run_tile if mode == RUNS else 0, aligned), [])
        if mode == FLAT:
            rows += [(t, start, 0, 0, 0) for start in range(0, numel, chunk)]
            continue
        slot_base = nslots
        if mode == RUNS:
            runs, per_tile = A * G, block // run_tile
            k_chunk = min(-(-K // run_tile) * run_tile, chunk)
            k_pieces = -(-K // k_chunk)
            for piece in range(k_pieces):
                k0 = piece * k_chunk
                rows += [(t, r0, k0, min(K, k0 + k_chunk), slot_base + piece * runs + r0)
                         for r0 in range(0, runs, per_tile)]
            nslots += k_pieces * runs
            ginfo.append((slot_base, k_pieces * A, G, 1, 1, G, group_base))
        else:
            per = max(1, chunk // block)
            row_blocks = -(-A // per)
            rows += [(t, rb * per, min(A, (rb + 1) * per), p0, slot_base + rb * L + p0)
                     for rb in range(row_blocks) for p0 in range(0, L, block)]
            nslots += row_blocks * L
            ginfo.append((slot_base, row_blocks, L, K, K, G, group_base))
        gmap += [(len(ginfo) - 1, b) for b in range(-(-G // GROUP_BLOCK))]

    ntensors = len(records)
    w_ptrs = [r[2].data_ptr() for r in records]
    c_ptrs = [(r[3] if r[3] is not None else r[2]).data_ptr() for r in records]
    values = w_ptrs + c_ptrs + tensors
    launches, partial_base = [], 0
    for (mode, run_tile, aligned), rows in sorted(by_launch.items()):
        start = len(values)
        values += [v for row in rows for v in row]
        launches.append(_Launch(mode, run_tile, aligned, (start, len(values)), len(rows), partial_base))
        partial_base += len(rows)
    ginfo_start = len(values)
    values += [v for row in ginfo for v in row]
    gmap_start = len(values)
    values += [v for row in gmap for v in row]

    plan = _Plan()
    plan.data, plan.host = _upload(torch.tensor(values, dtype=torch.int64), device)
    plan.w_ptrs = plan.data[:ntensors]
    plan.c_ptrs = plan.data[ntensors:2 * ntensors]
    plan.info = plan.data[2 * ntensors:2 * ntensors + TENSOR_FIELDS * ntensors]
    for launch in launches:
        launch.meta = plan.data[launch.meta[0]:launch.meta[1]]
    plan.launches = launches
    plan.ginfo = plan.data[ginfo_start:gmap_start]
    plan.gmap = plan.data[gmap_start:]
    plan.group_programs = len(gmap)
    plan.programs, plan.nslots, plan.chunk = partial_base, nslots, chunk
    plan.grouped = group_dim >= 0 and any(sizes)
    plan.ngroups = base if plan.grouped else 0
    plan.has_center = centers is not None
    plan.dtype, plan.device, plan.direct = dtype, device, direct
    plan.index = [r[0] for r in records]  # record -> param index
    plan.strides = [(r[0], r[1].stride()) for r in records if r[4] != FLAT]  # checked on every hit
    plan.reads = [r[2] for r in records]  # what is read as w (the param, or a contiguous copy)
    plan.copies = [(params[r[0]], r[2]) for r in records if r[2] is not params[r[0]]]
    return plan


def _aligned(operands, mode, geometry):
    if not all(o.data_ptr() % ALIGN_BYTES == 0 for o in operands):
        return False
    if mode == FLAT:
        return True
    stride = geometry[2] if mode == RUNS else geometry[1] * geometry[2]
    return all(stride % _vector(o.dtype) == 0 for o in operands)


def _target_table(pointers, device):
    """An int64 device table of the write targets' pointers (outputs, gradients), cached."""
    key = (device, _stream_key(device), pointers)
    return _cached(_targets, CACHE_SIZE, key, lambda: _upload(torch.tensor(pointers, dtype=torch.int64), device),
                   device, "target_hits", "target_builds")[0]


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _device_of(params):
    device = params[0].device
    if device.type not in DEVICE_TYPES:
        hint = " (under TRITON_INTERPRET=1 it runs CPU tensors only)" if _INTERPRET else ""
        raise RuntimeError(f"fastreg: the triton backend runs on {'/'.join(DEVICE_TYPES)} "
                           f"tensors, not {device.type}{hint}")
    return device


def _on(device):
    """Triton launches on the current CUDA device: make it the group's device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _constants(plan, launch):
    return dict(DTYPE=_TL_DTYPES[plan.dtype], ACC=_TL_DTYPES[acc_dtype(plan.dtype)], MODE=launch.mode,
                BLOCK=_block(plan.dtype), RUN_TILE=launch.run_tile or _block(plan.dtype),
                VEC=_vector(plan.dtype), ALIGNED=launch.aligned, HAS_CENTER=plan.has_center,
                num_warps=NUM_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)


def _acc_zeros(plan, n):
    return torch.zeros(max(n, 1), dtype=acc_dtype(plan.dtype), device=plan.device)


_constants_cache = {}


def _constant(value, plan):
    """A cached ``(1,)`` acc-dtype device tensor holding ``value`` (thresholds, placeholders): a
    kernel argument that never changes needs no allocation or host-to-device copy per call.
    Read-only: kernels never write it."""
    key = (float(value), acc_dtype(plan.dtype), plan.device)
    tensor = _constants_cache.get(key)
    if tensor is None:
        tensor = _constants_cache[key] = torch.full((1,), float(value), dtype=key[1], device=plan.device)
    return tensor


def _stage1(plan, threshold, shrink, partials, launches):
    """Stage 1 of the sums over ``launches``: partials (in place) and the slots."""
    slots = torch.empty(max(plan.nslots, 1), dtype=acc_dtype(plan.dtype), device=plan.device)
    for launch in launches:
        _sums_kernel[(launch.programs,)](plan.w_ptrs, plan.c_ptrs, plan.info, launch.meta,
                                         partials[2 * launch.partial_base:], slots, threshold, plan.chunk,
                                         SHRINK=shrink, **_constants(plan, launch))
    return slots


def _group_sq(plan, slots):
    group_sq = _acc_zeros(plan, plan.ngroups)
    if plan.group_programs:
        _group_sq_kernel[(plan.group_programs,)](slots, plan.ginfo, plan.gmap, group_sq, GROUP_BLOCK=GROUP_BLOCK,
                                                 num_warps=FINISH_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)
    return group_sq


def _finish(plan, partials, group_sq):
    out = torch.empty(3, dtype=acc_dtype(plan.dtype), device=plan.device)
    _finish_kernel[(1,)](partials, plan.programs, group_sq, plan.ngroups, out, BLOCK=FINISH_BLOCK,
                         num_warps=FINISH_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)
    return out, group_sq[:plan.ngroups]


def _empty_result(params, group_dim):
    acc = acc_dtype(params[0].dtype)
    n = sum(group_sizes(params, group_dim))
    return torch.zeros(3, dtype=acc, device=params[0].device), torch.zeros(n, dtype=acc, device=params[0].device)


def _grouped_launches(plan):
    return [launch for launch in plan.launches if launch.mode != FLAT]


def _sums(params, centers, group_dim, threshold):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim)
    plan = _plan(params, centers, group_dim)
    shrink = isinstance(threshold, torch.Tensor) or threshold != 0
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.reshape(1).to(acc_dtype(plan.dtype))
    else:
        threshold = _constant(threshold, plan)
    partials = _acc_zeros(plan, 2 * plan.programs)
    slots = _stage1(plan, threshold, shrink, partials, plan.launches)
    return _finish(plan, partials, _group_sq(plan, slots))


def _coeffs(coeffs, plan):
    acc = acc_dtype(plan.dtype)
    if coeffs.dtype == acc and coeffs.device == plan.device and coeffs.numel() >= 3 and coeffs.is_contiguous():
        return coeffs  # the usual case: the caller's (3,) vector as is
    coeffs = coeffs.to(device=plan.device, dtype=acc).reshape(-1)
    if coeffs.numel() < 3:
        coeffs = torch.cat([coeffs, coeffs.new_zeros(3 - coeffs.numel())])
    return coeffs.contiguous()


def _norms(plan, threshold, shrink, given, partials):
    """The groups' norms (of d, or of the shrunk values), from a stage-1 pass over the tensors
    with groups (its sums land in ``partials``); ``given`` norms replace the computed ones."""
    group_sq = _group_sq(plan, _stage1(plan, threshold, shrink, partials, _grouped_launches(plan)))
    if given is not None:
        return given.to(device=plan.device, dtype=acc_dtype(plan.dtype))[:plan.ngroups], group_sq
    return group_sq[:plan.ngroups].sqrt(), group_sq


def _elementwise(plan, op, targets, coeffs, group_coef, out_dtype, partials):
    acc = acc_dtype(plan.dtype)
    promote = torch.float64 if torch.float64 in (acc, out_dtype) else torch.float32
    for launch in plan.launches:
        reduce = op == 1 and launch.mode == FLAT
        _elementwise_kernel[(launch.programs,)](
            plan.w_ptrs, plan.c_ptrs, targets, plan.info, launch.meta, coeffs, group_coef,
            partials[2 * launch.partial_base:] if reduce else partials, plan.chunk,
            OUT_DTYPE=_TL_DTYPES[out_dtype], PROMOTE=_TL_DTYPES[promote], OP=op, REDUCE=reduce,
            F64=acc == torch.float64, **_constants(plan, launch))


def _targets_of(plan, wanted, pointers):
    """(device table of the write targets, copy-backs): ``wanted[k]`` for param k (its data
    pointer ``pointers[k]``), used as is when it walks memory in the order its param is read,
    else through a copy in that order."""
    table, copy_back = [], []
    for k, read in zip(plan.index, plan.reads):
        target = wanted[k]
        if target.is_contiguous() and read.is_contiguous():  # the common, cheap case
            table.append(pointers[k])
            continue
        if not (_is_dense(target) and _same_order(target, read)):
            work = torch.empty_like(read, dtype=target.dtype)
            work.copy_(target)
            copy_back.append((target, work))
            target = work
        table.append(target.data_ptr())
    return _target_table(tuple(table), plan.device), copy_back


def _misaligned(pointers):
    """Indices of the write targets that do not start on 16 bytes (their tensors' launches
    cannot use vector stores)."""
    return tuple(i for i, p in enumerate(pointers) if p % ALIGN_BYTES)


def _grads(params, centers, group_dim, coeffs, group_scale):
    outputs = [torch.empty_like(p) for p in params]
    if not any(p.numel() for p in params):
        return outputs
    pointers = list(map(torch.Tensor.data_ptr, outputs))
    plan = _plan(params, centers, group_dim, _misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    group_coef = _constant(0.0, plan)  # unused without groups
    if plan.grouped:  # the coefficient of d per group: 2·c2 + scale_g
        scale = 0 if group_scale is None else group_scale.to(device=plan.device, dtype=coeffs.dtype)
        group_coef = (2 * coeffs[1] + scale).expand(plan.ngroups).contiguous()
    targets, copy_back = _targets_of(plan, outputs, pointers)
    _elementwise(plan, 0, targets, coeffs, group_coef, plan.dtype, group_coef)
    for target, work in copy_back:
        target.copy_(work)
    return outputs


def _add_grad(params, grads_, centers, group_dim, coeffs, group_norms):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim)
    pointers = list(map(torch.Tensor.data_ptr, grads_))
    plan = _plan(params, centers, group_dim, _misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    partials = _acc_zeros(plan, 2 * plan.programs)
    group_sq = _acc_zeros(plan, plan.ngroups)
    group_coef = _constant(0.0, plan)  # unused without groups
    if plan.grouped:  # norms first (a pass over the tensors with groups), then the update
        norms, group_sq = _norms(plan, _constant(0.0, plan), False, group_norms, partials)
        positive = norms > 0
        group_coef = (2 * coeffs[1] + torch.where(positive, coeffs[2] / torch.where(positive, norms, 1), 0))
        group_coef = group_coef.to(coeffs.dtype).contiguous()
    targets, copy_back = _targets_of(plan, grads_, pointers)
    _elementwise(plan, 1, targets, coeffs, group_coef, grads_[0].dtype, partials)
    for target, work in copy_back:
        target.copy_(work)
    return _finish(plan, partials, group_sq)


def _prox(params, centers, group_dim, coeffs, group_norms):
    if not any(p.numel() for p in params):
        return None
    plan = _plan(params, centers, group_dim)
    coeffs = _coeffs(coeffs, plan)
    group_coef = _constant(0.0, plan)  # unused without groups
    if plan.grouped:  # the factor max(0, 1 - group_threshold / ‖s_g‖) / denominator per group
        partials = _acc_zeros(plan, 2 * plan.programs)
        norms, _ = _norms(plan, coeffs[:1], True, group_norms, partials)
        positive = norms > 0
        factor = torch.clamp(1 - coeffs[2] / torch.where(positive, norms, 1), min=0) / coeffs[1]
        group_coef = torch.where(positive, factor, 0).to(coeffs.dtype).contiguous()
    # In place: the target of each param is what its w is read from (the param, or a copy).
    _elementwise(plan, 2, plan.w_ptrs, coeffs, group_coef, plan.dtype, group_coef)
    for param, read in plan.copies:
        param.copy_(read)
    return None


# --------------------------------------------------------------------------------------
# The contract (fastreg/backends/__init__.py)
# --------------------------------------------------------------------------------------

def sums(params, centers, group_dim, threshold=0.0):
    device = _device_of(params)
    with _on(device):
        return _sums(params, centers, group_dim, threshold)


def grads(params, centers, group_dim, coeffs, group_scale):
    device = _device_of(params)
    with _on(device):
        return _grads(params, centers, group_dim, coeffs, group_scale)


def add_grad_(params, grads_, centers, group_dim, coeffs, group_norms):
    device = _device_of(params)
    with _on(device):
        return _add_grad(params, grads_, centers, group_dim, coeffs, group_norms)


def prox_(params, centers, group_dim, coeffs, group_norms):
    device = _device_of(params)
    with _on(device):
        _prox(params, centers, group_dim, coeffs, group_norms)


def launch_configs():
    """Every specialization ``sums`` / ``grads`` / ``add_grad_`` / ``prox_`` can launch with the
    module's tuning constants, as ``(name, kernel, signature, constexprs, options)`` for an
    ahead-of-time compile (``triton.compile(ASTSource(kernel, signature, constexprs), ...)``):
    each dtype, mode and tile, aligned and unaligned, with and without centers and
    thresholds, every gradient dtype. Used by tests/backends/test_triton_compile.py."""
    if triton is None:
        return []
    configs = []
    options = dict(num_warps=NUM_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)
    for dtype in _TL_DTYPES:
        acc = acc_dtype(dtype)
        block = _block(dtype)
        acc_ptr = "*fp64" if acc == torch.float64 else "*fp32"
        tables = {"w_ptrs": "*i64", "c_ptrs": "*i64", "info": "*i64", "meta": "*i64"}
        for mode, run_tile in ((FLAT, block), (RUNS, min(RUN_TILE, block)), (RUNS, block), (ROWS, block)):
            for aligned in (True, False):
                common = dict(DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[acc], MODE=mode, ALIGNED=aligned, BLOCK=block,
                              RUN_TILE=run_tile, VEC=_vector(dtype))
                tag = f"{str(dtype)[6:]}-{['flat', 'runs', 'rows'][mode]}{run_tile if mode == RUNS else ''}-" \
                      f"{'aligned' if aligned else 'unaligned'}"
                for center in (False, True):
                    for shrink in (False, True):
                        signature = dict(tables, partials=acc_ptr, slots=acc_ptr, threshold=acc_ptr, chunk="i64")
                        constexprs = dict(common, HAS_CENTER=center, SHRINK=shrink)
                        configs.append((f"sums-{tag}{'-centered' if center else ''}{'-shrunk' if shrink else ''}",
                                        _sums_kernel, signature, constexprs, options))
                ops = [(0, dtype, "grads"), (2, dtype, "prox")] + [(1, g, f"add_grad-{str(g)[6:]}") for g in _TL_DTYPES]
                for (op, out_dtype, name), center in ((o, c) for o in ops for c in (False, True)):
                    promote = torch.float64 if torch.float64 in (acc, out_dtype) else torch.float32
                    signature = dict(tables, out_ptrs="*i64", coeffs=acc_ptr, group_coef=acc_ptr, partials=acc_ptr,
                                     chunk="i64")
                    constexprs = dict(common, OUT_DTYPE=_TL_DTYPES[out_dtype], PROMOTE=_TL_DTYPES[promote], OP=op,
                                      HAS_CENTER=center, REDUCE=op == 1 and mode == FLAT, F64=acc == torch.float64)
                    configs.append((f"{name}-{tag}{'-centered' if center else ''}", _elementwise_kernel, signature,
                                    constexprs, options))
    for acc_ptr in ("*fp32", "*fp64"):
        configs.append((f"group_sq-{acc_ptr[1:]}", _group_sq_kernel,
                        dict(slots=acc_ptr, ginfo="*i64", gmap="*i64", group_sq=acc_ptr),
                        dict(GROUP_BLOCK=GROUP_BLOCK), dict(num_warps=FINISH_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)))
        configs.append((f"finish-{acc_ptr[1:]}", _finish_kernel,
                        dict(partials=acc_ptr, nparts="i64", group_sq=acc_ptr, ngroups="i64", out=acc_ptr),
                        dict(BLOCK=FINISH_BLOCK), dict(num_warps=FINISH_WARPS, enable_fp_fusion=ENABLE_FP_FUSION)))
    return configs
