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
  step can be CUDA-graph captured (with a workspace: see "Ownership").
* **Floating-point fusion** is set explicitly on every launch: ``enable_fp_fusion=True``
  (``a * b + c`` is one FMA, rounded once, as in the C++ kernels), so a change of Triton's
  default (off from Triton 3.10) changes no result.
* **Ownership** (the rules are stated once, in ``fastreg/backends/_workspace.py``). A call's
  ``_Tables`` (the tensors' pointers, geometry and programs: a host loop plus one host-to-device
  copy to build) hold in ``owners`` every tensor whose address they contain: detached aliases of
  the parameters as read (a later ``p.data = ...`` cannot free what they point at), the
  centers, and every copy made for the kernels; ``addresses()`` lists those addresses. This
  module keeps no tensor and no table. Tables are cached only in the ``workspace`` the caller
  passes (each kernel group of a ``Penalty`` owns one: a small LRU that dies with it), keyed by
  the operands' pointers and shapes (plus, checked on a hit, the strides the tables depend on),
  the group dim, the tuning constants and the current stream; while an entry holds the storages
  its key's addresses cannot be given to other tensors. Keying by stream orders a table's upload
  before every use. Without a workspace the tables live for the call. Tables that read copies
  (non-dense parameters, centers in another memory order) are never cached: the copies are made
  for each call and live as long as its tables; in-place results on a copy are copied back
  explicitly. The write targets (gradients, outputs: new pointers every step) get a
  ``_Targets`` table per call, owned by the call. The zero threshold and placeholder are owned
  by the tables; a float threshold becomes a device tensor per call (``torch.full``: a fill
  kernel, no host-to-device copy, nothing kept). On CUDA, tables are uploaded from pinned
  memory with a non_blocking copy (the caching host allocator keeps the pinned block until the
  copy has run), and a table freed after the call is reused only by later work on the stream.
* **CUDA-graph capture.** A captured upload happens only when the graph replays, and the graph
  reads its tables at every replay: tables built during capture go to ``workspace.captured``
  (kept as long as the workspace, hence as long as the ``Penalty`` whose graphs replay them),
  never into the entries eager calls look in; cached tables used during capture and the
  per-call target tables are kept there too. Without a workspace a call under capture raises
  (nothing could keep its tables alive): call through a ``Penalty``, or pass a ``Workspace``.
* **Layouts.** Kernels walk memory linearly. A tensor that is dense (contiguous in some
  dimension order, e.g. ``w.t()`` or channels_last) is used as is, its groups located from its
  strides; centers and gradients in another order, and non-dense tensors, are read through a
  copy in the parameter's order.
* **Host time per call** (what a call costs the training loop's thread while the GPU works;
  ``python -m bench.host_overhead`` measures it with the kernels stubbed): a cache hit reads each
  tensor's pointer and shape (C-level maps) and the strides of the few tensors that need them;
  ``add_grad_`` and ``grads`` build and upload their targets' pointer table. ``grads`` must return
  one fresh tensor per parameter (148 ``empty_like`` are most of its ~1 ms for GPT-2 shapes on
  this host).

Tuning constants are module-level and read at every call, so tests can shrink them and the
GPU check can sweep them (``BLOCK``, ``BLOCK_FP64``, ``NUM_WARPS``, ``MAX_CHUNK``,
``TARGET_PROGRAMS``, ``RUN_TILE``). Not measured on a GPU yet: ``python -m bench.gpu_check``
sweeps them on the first GPU it runs on.
"""

import contextlib
import os

import torch

from fastreg.backends._geometry import acc_dtype, group_sizes, has_groups, memory_geometry

NAME = "triton"
VERSIONS_BUMPED = False  # kernels write through raw pointers: fastreg._ops bumps

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
# Tables: the device tables of a (params, centers) set, with the tensors they point into
# --------------------------------------------------------------------------------------

class _Launch:
    """One kernel launch: a mode, a tile width, an alignment, its programs' table rows."""

    __slots__ = ("mode", "run_tile", "aligned", "meta", "programs", "partial_base")

    def __init__(self, mode, run_tile, aligned, meta, programs, partial_base):
        self.mode, self.run_tile, self.aligned = mode, run_tile, aligned
        self.meta, self.programs, self.partial_base = meta, programs, partial_base


class _Tables:
    """Everything the kernels need about a set of tensors: one int64 device tensor holding the
    pointer tables of w and c, the per-tensor geometry, the per-program rows of every launch
    and the group-reduction rows; the launches and buffer sizes; and, in ``owners``, every
    tensor whose address the tables hold (see "Ownership" in the module docstring)."""

    __slots__ = ("data", "host", "pointers", "owners", "zero", "w_ptrs", "c_ptrs", "info", "launches", "ginfo",
                 "gmap", "group_programs", "programs", "nslots", "ngroups", "chunk", "grouped", "has_center",
                 "dtype", "device", "direct", "reads", "copies", "index", "strides")

    def addresses(self):
        """Every device address written into the tables (w's and c's data pointers); each lies
        in the storage of one of ``owners``."""
        return list(self.pointers)


class _Targets:
    """One call's table of write-target pointers (gradients, outputs, or copies of them in the
    order their parameters are read), with the tensors it points into."""

    __slots__ = ("table", "host", "pointers", "owners")

    def addresses(self):
        return list(self.pointers)


def _stream_key(device):
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _upload(values, device):
    """``(device tensor, host tensor)`` holding ``values`` (a CPU int64 tensor), without a host
    sync. A pageable host-to-device copy synchronises the stream; a pinned non_blocking one does
    not, and the CUDA caching host allocator keeps the pinned block until that copy has run. A
    copy captured in a CUDA graph rereads the pinned block at every replay: whoever keeps the
    device table for the graph keeps the host tensor too."""
    if device.type != "cuda":
        return values, values
    host = values.pin_memory()
    return host.to(device, non_blocking=True), host


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _no_workspace_under_capture():
    return RuntimeError(
        "fastreg: the triton backend was called without a workspace while a CUDA graph was being captured. "
        "The device tables such a call builds are read when the graph replays, so they must outlive the call, "
        "and only a Workspace can keep them: call it through a fastreg.Penalty (each of its kernel groups owns "
        "one), or pass workspace=fastreg.backends._workspace.Workspace() and keep it as long as the graph.")


def _keep_for_graph(workspace, item):
    """Keep cached tables used during a capture for as long as the workspace: the graph reads
    them at every replay, even after the LRU has dropped them."""
    if not any(kept is item for kept in workspace.captured):
        workspace.captured.append(item)


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
    """What tables depend on, cheaply: every data pointer and shape (C-level maps: ~0.3 µs a
    tensor). Strides matter only where the tables use them: a hit checks those (``_tables``)."""
    return tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(torch.Tensor.size, tensors))


def _tables(params, centers, group_dim, workspace, capturing, misaligned=()):
    """The tables for ``params`` (and ``centers``): from ``workspace`` when every tensor is where
    it was, else built (and cached there when they read no copy); ``misaligned``: indices whose
    write target is not 16-byte aligned. See "Ownership" in the module docstring."""
    if workspace is None:
        if capturing:
            raise _no_workspace_under_capture()
        return _build_tables(params, centers, group_dim, misaligned)
    device, dtype = params[0].device, params[0].dtype
    params_at, centers_at = _signature(params), None if centers is None else _signature(centers)
    setting = (device, dtype, _stream_key(device), group_dim, misaligned, BLOCK, BLOCK_FP64, MAX_CHUNK,
               TARGET_PROGRAMS, RUN_TILE, MIN_RUN, RUN_LONG, GROUP_BLOCK)
    key = (*setting, params_at, centers_at)
    tables = workspace.get(key)
    if tables is not None:
        operands = (params, centers)
        if all(operands[which][i].stride() == stride for which, i, stride in tables.strides):
            if capturing:
                _keep_for_graph(workspace, tables)
            return tables
    tables = _build_tables(params, centers, group_dim, misaligned)
    if capturing:  # uploaded only when the graph replays: never where an eager call looks
        workspace.keep_for_capture(tables)
    elif tables.direct:  # tables reading copies are valid for this call only
        # The same setting and shapes at other addresses (p.data swapped) replace the old tables,
        # so a swapped-out storage lives no longer than the next build.
        family = (*setting, params_at[1], None if centers_at is None else centers_at[1])
        workspace.put(key, tables, family=family)
    return tables


def _build_tables(params, centers, group_dim, misaligned):
    dtype, device = params[0].dtype, params[0].device
    block = _block(dtype)
    sizes = group_sizes(params, group_dim)
    records, base, direct = [], 0, True
    for i, p in enumerate(params):
        group_base, base = base, base + sizes[i]
        if not p.numel():
            continue
        # Owned by the tables: a detached alias of the parameter (its storage stays valid even if
        # the user swaps p.data), or the copy the kernels read instead.
        alias = p.detach()
        w = alias if _is_dense(p) else alias.contiguous()
        c = None
        if centers is not None:
            c = centers[i].detach()
            if not (_is_dense(c) and _same_order(c, w)):
                c = torch.empty_like(w).copy_(c)  # in w's memory order
                direct = False
        direct = direct and w is alias
        grouped = has_groups(p, group_dim)
        A, G, K = memory_geometry(w, group_dim) if grouped else (1, 1, p.numel())
        mode = FLAT if not grouped else (RUNS if K >= MIN_RUN or G == 1 else ROWS)
        run_tile = block if K >= RUN_LONG * block else min(RUN_TILE, block)
        operands = (w,) if c is None else (w, c)
        aligned = i not in misaligned and _aligned(operands, mode, (A, G, K))
        records.append((i, p, w, c, mode, run_tile, (A, G, K), group_base, aligned, w is alias))

    total = sum(r[1].numel() for r in records)
    chunk = _chunk(total, block)
    tensors, by_launch, ginfo, gmap, nslots = [], {}, [], [], 0
    for t, (_, p, _, _, mode, run_tile, (A, G, K), group_base, aligned, _) in enumerate(records):
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

    tables = _Tables()
    tables.data, tables.host = _upload(torch.tensor(values, dtype=torch.int64), device)
    tables.pointers = w_ptrs + c_ptrs
    tables.owners = [r[2] for r in records] + [r[3] for r in records if r[3] is not None]
    tables.zero = torch.zeros(1, dtype=acc_dtype(dtype), device=device)  # threshold 0, unused group_coef
    tables.w_ptrs = tables.data[:ntensors]
    tables.c_ptrs = tables.data[ntensors:2 * ntensors]
    tables.info = tables.data[2 * ntensors:2 * ntensors + TENSOR_FIELDS * ntensors]
    for launch in launches:
        launch.meta = tables.data[launch.meta[0]:launch.meta[1]]
    tables.launches = launches
    tables.ginfo = tables.data[ginfo_start:gmap_start]
    tables.gmap = tables.data[gmap_start:]
    tables.group_programs = len(gmap)
    tables.programs, tables.nslots, tables.chunk = partial_base, nslots, chunk
    tables.grouped = group_dim >= 0 and any(sizes)
    tables.ngroups = base if tables.grouped else 0
    tables.has_center = centers is not None
    tables.dtype, tables.device, tables.direct = dtype, device, direct
    tables.index = [r[0] for r in records]  # record -> param index
    # What a cache hit must find unchanged besides pointers and shapes (``(operand, index,
    # stride)``, operand 0: params, 1: centers): the strides of tensors with groups (their
    # geometry), and with centers those of every param and center of ndim >= 2 (whether c is
    # read in w's order). Other tensors depend on their strides only through their density.
    tables.strides = []
    for i, p, mode in ((r[0], r[1], r[4]) for r in records):
        if mode != FLAT or (centers is not None and p.ndim >= 2):
            tables.strides.append((0, i, p.stride()))
        if centers is not None and p.ndim >= 2:
            tables.strides.append((1, i, centers[i].stride()))
    tables.reads = [None if r[9] else r[2] for r in records]  # None: the param itself, else its copy
    tables.copies = [(params[r[0]], r[2]) for r in records if not r[9]]
    return tables


def _aligned(operands, mode, geometry):
    if not all(o.data_ptr() % ALIGN_BYTES == 0 for o in operands):
        return False
    if mode == FLAT:
        return True
    stride = geometry[2] if mode == RUNS else geometry[1] * geometry[2]
    return all(stride % _vector(o.dtype) == 0 for o in operands)


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


def _sums(params, centers, group_dim, threshold, workspace, capturing):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim)
    plan = _tables(params, centers, group_dim, workspace, capturing)
    shrink = isinstance(threshold, torch.Tensor) or threshold != 0
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.reshape(1).to(acc_dtype(plan.dtype))
    elif shrink:  # a float (the sharded prox's lr * l1): one fill kernel, no copy, nothing kept
        threshold = torch.full((1,), float(threshold), dtype=acc_dtype(plan.dtype), device=plan.device)
    else:
        threshold = plan.zero
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


def _targets_of(plan, params, wanted, pointers, workspace, capturing):
    """(this call's ``_Targets``, copy-backs): ``wanted[k]`` for param k (its data pointer
    ``pointers[k]``), used as is when it walks memory in the order param k is read (the param as
    it is now, or the tables' copy of it), else through a copy in that order."""
    table, copy_back = [], []
    for k, read in zip(plan.index, plan.reads):
        target = wanted[k]
        if read is None:
            read = params[k]
        if target.is_contiguous() and read.is_contiguous():  # the common, cheap case
            table.append(pointers[k])
            continue
        if not (_is_dense(target) and _same_order(target, read)):
            work = torch.empty_like(read, dtype=target.dtype)
            work.copy_(target)
            copy_back.append((target, work))
            target = work
        table.append(target.data_ptr())
    targets = _Targets()
    targets.pointers = table
    targets.owners = list(wanted) + [work for _, work in copy_back]
    targets.table, targets.host = _upload(torch.tensor(table, dtype=torch.int64), plan.device)
    if capturing:  # the graph rereads the pinned table at every replay (a workspace exists: _tables)
        workspace.captured.append(targets)
    return targets, copy_back


def _misaligned(pointers):
    """Indices of the write targets that do not start on 16 bytes (their tensors' launches
    cannot use vector stores)."""
    return tuple(i for i, p in enumerate(pointers) if p % ALIGN_BYTES)


def _grads(params, centers, group_dim, coeffs, group_scale, workspace, capturing):
    outputs = [torch.empty_like(p) for p in params]
    if not any(p.numel() for p in params):
        return outputs
    pointers = list(map(torch.Tensor.data_ptr, outputs))
    plan = _tables(params, centers, group_dim, workspace, capturing, _misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # the coefficient of d per group: 2·c2 + scale_g
        scale = 0 if group_scale is None else group_scale.to(device=plan.device, dtype=coeffs.dtype)
        group_coef = (2 * coeffs[1] + scale).expand(plan.ngroups).contiguous()
    targets, copy_back = _targets_of(plan, params, outputs, pointers, workspace, capturing)
    _elementwise(plan, 0, targets.table, coeffs, group_coef, plan.dtype, group_coef)
    for target, work in copy_back:
        target.copy_(work)
    return outputs


def _add_grad(params, grads_, centers, group_dim, coeffs, group_norms, workspace, capturing):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim)
    pointers = list(map(torch.Tensor.data_ptr, grads_))
    plan = _tables(params, centers, group_dim, workspace, capturing, _misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    partials = _acc_zeros(plan, 2 * plan.programs)
    group_sq = _acc_zeros(plan, plan.ngroups)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # norms first (a pass over the tensors with groups), then the update
        norms, group_sq = _norms(plan, plan.zero, False, group_norms, partials)
        positive = norms > 0
        group_coef = (2 * coeffs[1] + torch.where(positive, coeffs[2] / torch.where(positive, norms, 1), 0))
        group_coef = group_coef.to(coeffs.dtype).contiguous()
    targets, copy_back = _targets_of(plan, params, grads_, pointers, workspace, capturing)
    _elementwise(plan, 1, targets.table, coeffs, group_coef, grads_[0].dtype, partials)
    for target, work in copy_back:
        target.copy_(work)
    return _finish(plan, partials, group_sq)


def _prox(params, centers, group_dim, coeffs, group_norms, workspace, capturing):
    if not any(p.numel() for p in params):
        return None
    plan = _tables(params, centers, group_dim, workspace, capturing)
    coeffs = _coeffs(coeffs, plan)
    group_coef = plan.zero  # unused without groups
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

def sums(params, centers, group_dim, threshold=0.0, workspace=None):
    device = _device_of(params)
    with _on(device):
        return _sums(params, centers, group_dim, threshold, workspace, _capturing(device))


def grads(params, centers, group_dim, coeffs, group_scale, workspace=None):
    device = _device_of(params)
    with _on(device):
        return _grads(params, centers, group_dim, coeffs, group_scale, workspace, _capturing(device))


def add_grad_(params, grads_, centers, group_dim, coeffs, group_norms, workspace=None):
    device = _device_of(params)
    with _on(device):
        return _add_grad(params, grads_, centers, group_dim, coeffs, group_norms, workspace, _capturing(device))


def prox_(params, centers, group_dim, coeffs, group_norms, workspace=None):
    device = _device_of(params)
    with _on(device):
        _prox(params, centers, group_dim, coeffs, group_norms, workspace, _capturing(device))


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
