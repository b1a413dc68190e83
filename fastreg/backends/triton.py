"""The Triton backend: multi-tensor CUDA kernels, one launch for all tensors of a group.

Design (see DESIGN.md §3), shared by the four kernels:

* **Work split.** Every non-empty tensor is cut into chunks of ``CHUNK`` elements; one
  program (CUDA block) handles one chunk, looping over it in ``BLOCK``-element tiles.
  All tiles but the last of a tensor are loaded without a mask, so they vectorise.
* **Device table.** Kernels receive no per-tensor arguments. One int64 device tensor holds

      [ data pointers of operand 0 (T) | ... of operand k (T) | numels (T) | block map (2B) ]

  where the block map gives, for program ``b``, ``(tensor index, chunk index)``. A kernel
  loads its tensor's pointer and casts it to the group's dtype (``.to(tl.pointer_type(..))``,
  the pattern of Triton's grouped-GEMM tutorial). Grids are ``(B,)``; there is no limit on
  the number of tensors per launch.
* **64-bit offsets.** ``tl.program_id(0)`` is cast to int64 first; tensor indices, chunk
  indices, numels and pointers are int64 table entries, so chunk starts, tile offsets,
  masks and partial-slot indices are all int64: tensors above 2**31 elements are fine.
* **Table cache.** Building a table is a host loop plus one host-to-device copy, so tables
  are cached (small LRU) keyed by device, dtype, ``CHUNK`` and the tensors' data pointers
  and sizes; a training step with parameters that do not move rebuilds nothing. A miss
  copies from pinned memory with ``non_blocking=True``: no host synchronisation even then.
  The tables hold only pointers and sizes, i.e. exactly what the key holds, so a hit is
  always valid, even if the memory now belongs to another tensor of the same size.
  ``grads`` must write fresh tensors (custom ops may not return aliasing outputs, so no flat
  buffer): their pointers go in a second, small table (``T`` pointers; the block map comes
  from the cached parameter table), cached the same way, which hits whenever the caching
  allocator hands out the same addresses again, as it does step after step.
* **Deterministic sums, no atomics.** Stage 1 writes one ``[Σ|w|, Σw²]`` partial pair per
  program into its own slot (accumulated in fp32, fp64 for fp64 tensors: per lane over the
  tiles, then a tree over the lanes); stage 2 is a one-program kernel that adds the slots in
  a fixed order in fp64. Same inputs, same bits, every call; two launches per group.
* **Coefficients** are loaded inside the kernels from the ``(2,)`` device tensor: no
  ``.item()``, nothing read back on the host, so steps can be CUDA-graph captured (after a
  warm-up call has filled the table cache).
* **Layouts.** Kernels walk memory linearly. A tensor that is dense (contiguous in some
  dimension order, e.g. ``w.t()`` or channels_last) is used as is, paired with operands of
  the same memory order; anything else is read through a contiguous copy, and in-place
  results computed on a contiguous temporary are copied back explicitly.

Tuning constants are module-level (``CHUNK``, ``BLOCK``, ``BLOCK_FP64``, ``NUM_WARPS``,
``FINISH_BLOCK``), read at every call, so tests can shrink them and benchmarks can sweep
them. Defaults follow apex's ``multi_tensor_apply`` (65536-element chunks, one block each):

* ``CHUNK = 65536`` keeps per-program bookkeeping (four int64 table loads) negligible and
  the partial buffer tiny (one pair per 64K elements), while a 25M-parameter model still
  spreads over ~400 programs and a 124M one over ~1900 (H100: 132 SMs).
* ``BLOCK = 2048`` with ``NUM_WARPS = 8`` (256 threads): 8 elements per thread per tile,
  i.e. two 128-bit loads per thread and operand for fp32, one for fp16/bf16 (apex moves 4
  elements per thread with 512 threads), 32 tiles per chunk. Checked by compiling for
  sm_90 without a GPU (ptxas): 40-64 registers, no spills, ``ld.global.v4`` in the main
  loop when every pointer is 16-byte aligned (``ALIGNED``); 4096 needed up to 136
  registers (spills for bf16 ``add_grad_``), i.e. half the resident blocks. fp64 uses
  ``BLOCK_FP64 = 1024`` (4 elements, two 128-bit loads per thread, <= 64 registers).
  Not measured on a GPU: sweep ``BLOCK``/``NUM_WARPS`` on the H100 before trusting them.
* No autotuning: the in-place kernels would need ``reset_to_zero``/``restore_value``
  (DESIGN §4), and the choice is bandwidth-bound and shape-independent.
"""

import contextlib
import os
from collections import OrderedDict

import torch

NAME = "triton"

# Tuning knobs (read at call time; see the module docstring for the rationale).
CHUNK = 65536  # elements per program; a multiple of BLOCK and BLOCK_FP64
BLOCK = 2048  # elements per tile for 2- and 4-byte dtypes (a power of two)
BLOCK_FP64 = 1024  # elements per tile for float64 (a power of two)
NUM_WARPS = 8
FINISH_BLOCK = 1024  # stage-2 tile (partial pairs per iteration)
FINISH_WARPS = 4
CACHE_SIZE = 32  # parameter tables kept (LRU)
OUT_CACHE_SIZE = 32  # output-pointer tables of grads() kept (LRU)
ALIGN_BYTES = 16  # pointers aligned to this get the vectorisation hint


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
    def _chunk_of_program(block_map, numels, CHUNK: tl.constexpr):
        """(program id, tensor index, first element, element count) of this program's chunk.

        All int64: the program id is widened before any offset arithmetic.
        """
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(block_map + 2 * pid)
        start = tl.load(block_map + 2 * pid + 1) * CHUNK
        return pid, t, start, tl.minimum(tl.load(numels + t) - start, CHUNK)

    @triton.jit
    def _operand(ptrs, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """Tensor ``t``'s data pointer from the table, cast to DTYPE, at the chunk's start."""
        ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr + start

    @triton.jit
    def _gradient_coeffs(coeffs, ACC: tl.constexpr):
        """(l1, 2·l2) from the (2,) coefficient tensor: loaded on the device, never on the host."""
        return tl.load(coeffs).to(ACC), 2 * tl.load(coeffs + 1).to(ACC)

    @triton.jit
    def _gradient(x, c1, c2):
        """The penalty's gradient l1·sign(w) + 2·l2·w, with c2 = 2·l2 (in x's acc dtype)."""
        return c1 * _sign(x) + c2 * x

    @triton.jit
    def _sums_kernel(
        w_ptrs,  # int64[T]: data pointers
        numels,  # int64[T]
        block_map,  # int64[2B]: (tensor, chunk) per program
        partials,  # acc[2B]: (Σ|w|, Σw²) per program
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid, t, start, count = _chunk_of_program(block_map, numels, CHUNK)
        w = _operand(w_ptrs, t, start, DTYPE, ALIGNED)
        lanes = tl.arange(0, BLOCK)
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            x = tl.load(w + i + lanes).to(ACC)
            acc_abs += tl.abs(x)
            acc_sq += x * x
        if full < count:
            offs = full + lanes
            x = tl.load(w + offs, mask=offs < count, other=0.0).to(ACC)
            acc_abs += tl.abs(x)
            acc_sq += x * x
        tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))

    @triton.jit
    def _finish_kernel(partials, out, nblocks, BLOCK: tl.constexpr):
        """Stage 2: one program adds the partial pairs in a fixed order, in fp64."""
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        acc_abs = tl.zeros([BLOCK], dtype=tl.float64)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, nblocks, BLOCK):
            offs = i + lanes
            mask = offs < nblocks
            acc_abs += tl.load(partials + 2 * offs, mask=mask, other=0.0).to(tl.float64)
            acc_sq += tl.load(partials + 2 * offs + 1, mask=mask, other=0.0).to(tl.float64)
        tl.store(out, tl.sum(acc_abs, axis=0).to(out.dtype.element_ty))
        tl.store(out + 1, tl.sum(acc_sq, axis=0).to(out.dtype.element_ty))

    @triton.jit
    def _grads_kernel(
        w_ptrs,  # int64[T]
        out_ptrs,  # int64[T]
        numels,
        block_map,
        coeffs,  # acc[2]: (c1, c2)
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid, t, start, count = _chunk_of_program(block_map, numels, CHUNK)
        w = _operand(w_ptrs, t, start, DTYPE, ALIGNED)
        g = _operand(out_ptrs, t, start, DTYPE, ALIGNED)
        c1, c2 = _gradient_coeffs(coeffs, ACC)
        lanes = tl.arange(0, BLOCK)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            x = tl.load(w + i + lanes).to(ACC)
            tl.store(g + i + lanes, _gradient(x, c1, c2).to(DTYPE))
        if full < count:
            offs = full + lanes
            mask = offs < count
            x = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
            tl.store(g + offs, _gradient(x, c1, c2).to(DTYPE), mask=mask)

    @triton.jit
    def _add_grad_kernel(
        w_ptrs,  # int64[T]
        g_ptrs,  # int64[T]
        numels,
        block_map,
        coeffs,  # acc[2]: (c1, c2)
        partials,  # acc[2B]
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid, t, start, count = _chunk_of_program(block_map, numels, CHUNK)
        w = _operand(w_ptrs, t, start, DTYPE, ALIGNED)
        g = _operand(g_ptrs, t, start, DTYPE, ALIGNED)
        c1, c2 = _gradient_coeffs(coeffs, ACC)
        lanes = tl.arange(0, BLOCK)
        acc_abs = tl.zeros([BLOCK], dtype=ACC)
        acc_sq = tl.zeros([BLOCK], dtype=ACC)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            x = tl.load(w + i + lanes).to(ACC)
            old = tl.load(g + i + lanes).to(ACC)
            tl.store(g + i + lanes, (old + _gradient(x, c1, c2)).to(DTYPE))
            acc_abs += tl.abs(x)
            acc_sq += x * x
        if full < count:
            offs = full + lanes
            mask = offs < count
            x = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
            old = tl.load(g + offs, mask=mask, other=0.0).to(ACC)
            tl.store(g + offs, (old + _gradient(x, c1, c2)).to(DTYPE), mask=mask)
            acc_abs += tl.abs(x)
            acc_sq += x * x
        tl.store(partials + 2 * pid, tl.sum(acc_abs, axis=0))
        tl.store(partials + 2 * pid + 1, tl.sum(acc_sq, axis=0))

    @triton.jit
    def _shrink(x, threshold, denominator, F64: tl.constexpr):
        # NaN stays NaN (as with torch.clamp_min): a diverged weight is not silently zeroed.
        shrunk = _sign(x) * tl.maximum(tl.abs(x) - threshold, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if F64:
            return shrunk / denominator
        else:
            # fp32 '/' lowers to an approximate division on NVIDIA GPUs; div_rn is IEEE.
            return tl.math.div_rn(shrunk, denominator)

    @triton.jit
    def _prox_kernel(
        w_ptrs,  # int64[T]
        numels,
        block_map,
        coeffs,  # acc[2]: (threshold, denominator)
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
        F64: tl.constexpr,  # ACC is float64
    ):
        pid, t, start, count = _chunk_of_program(block_map, numels, CHUNK)
        w = _operand(w_ptrs, t, start, DTYPE, ALIGNED)
        threshold = tl.load(coeffs).to(ACC)
        denominator = tl.load(coeffs + 1).to(ACC)
        lanes = tl.arange(0, BLOCK)
        full = count - count % BLOCK
        for i in range(0, full, BLOCK):
            x = tl.load(w + i + lanes).to(ACC)
            tl.store(w + i + lanes, _shrink(x, threshold, denominator, F64).to(DTYPE))
        if full < count:
            offs = full + lanes
            mask = offs < count
            x = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
            tl.store(w + offs, _shrink(x, threshold, denominator, F64).to(DTYPE), mask=mask)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float64: tl.float64,
    }


# --------------------------------------------------------------------------------------
# Device tables and their cache
# --------------------------------------------------------------------------------------

class _Table:
    """One int64 device tensor: [pointers of each operand | numels | block map]."""

    __slots__ = ("data", "host", "operands", "numels", "block_map", "nblocks", "aligned",
                 "stream", "pinned_by_graph")

    def __init__(self, data, host, ntensors, noperands, nblocks, aligned):
        self.data = data
        self.stream = torch.cuda.current_stream(data.device).cuda_stream if data.is_cuda else None
        self.pinned_by_graph = False
        self.host = host  # keeps a pinned staging buffer alive as long as the table
        self.operands = [data[k * ntensors:(k + 1) * ntensors] for k in range(noperands)]
        self.numels = data[noperands * ntensors:(noperands + 1) * ntensors]
        self.block_map = data[(noperands + 1) * ntensors:]
        self.nblocks = nblocks
        self.aligned = aligned


_tables = OrderedDict()  # parameter tables: key -> _Table
_out_tables = OrderedDict()  # grads() output pointers: key -> _Table
_graph_tables = []  # tables created during CUDA-graph capture: never released
_stats = {"builds": 0, "hits": 0, "out_builds": 0, "out_hits": 0}


def cache_info():
    """Counters of table builds and cache hits (for tests and benchmarks)."""
    return dict(_stats, size=len(_tables), out_size=len(_out_tables))


def cache_clear():
    _tables.clear()
    _out_tables.clear()
    for k in _stats:
        _stats[k] = 0


def _upload(values, device):
    """An int64 device tensor holding ``values`` (a CPU int64 tensor), without a host sync."""
    if device.type != "cuda":
        return values, values
    # A pageable host-to-device copy synchronises the stream; a pinned non_blocking one does
    # not. The caching host allocator keeps the pinned block until the copy has completed,
    # and the table keeps a reference to it anyway (needed if the copy is graph-captured).
    host = values.pin_memory()
    return host.to(device, non_blocking=True), host


def _lookup(cache, limit, key, build, hit_stat, build_stat):
    table = cache.get(key)
    if table is not None:
        cache.move_to_end(key)
        _stats[hit_stat] += 1
        return table
    table = build()
    _stats[build_stat] += 1
    cache[key] = table
    while len(cache) > limit:
        cache.popitem(last=False)
    return table


def _param_table(operands, numels, dtype, device, chunk):
    """The table for ``operands`` (lists of data pointers, one per operand) and ``numels``."""
    key = (device, dtype, chunk, numels, *operands)

    def build():
        ntensors = len(numels)
        sizes = torch.tensor(numels, dtype=torch.int64)
        blocks = (sizes + (chunk - 1)) // chunk
        nblocks = int(blocks.sum())
        tensor_of_block = torch.repeat_interleave(torch.arange(ntensors, dtype=torch.int64), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        chunk_of_block = torch.arange(nblocks, dtype=torch.int64) - first_block[tensor_of_block]
        block_map = torch.stack([tensor_of_block, chunk_of_block], dim=1).reshape(-1)
        pointers = torch.tensor([p for op in operands for p in op], dtype=torch.int64)
        data, host = _upload(torch.cat([pointers, sizes, block_map]), device)
        aligned = all(p % ALIGN_BYTES == 0 for op in operands for p in op)
        return _Table(data, host, ntensors, len(operands), nblocks, aligned)

    return _lookup(_tables, CACHE_SIZE, key, build, "hits", "builds")


def _out_table(pointers, device):
    key = (device, pointers)

    def build():
        data, host = _upload(torch.tensor(pointers, dtype=torch.int64), device)
        aligned = all(p % ALIGN_BYTES == 0 for p in pointers)
        return _Table(data, host, len(pointers), 1, 0, aligned)

    return _lookup(_out_tables, OUT_CACHE_SIZE, key, build, "out_hits", "out_builds")


def _use(table, device):
    """Keep ``table`` valid for the work about to be queued on the current stream.

    A CUDA graph bakes the table's address (and, for a table built during capture, the copy
    from its pinned staging buffer) into its replays: a table used while capturing is never
    released. A table used on a stream other than the one it was allocated on is recorded
    on that stream, so an LRU eviction cannot hand its memory out while a kernel reads it.
    """
    if device.type != "cuda":
        return
    if torch.cuda.is_current_stream_capturing():
        if not table.pinned_by_graph:
            table.pinned_by_graph = True
            _graph_tables.append(table)
        return
    stream = torch.cuda.current_stream(device)
    if stream.cuda_stream != table.stream:
        table.data.record_stream(stream)


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------

def _is_dense(t):
    """True when ``t``'s elements fill ``t.numel()`` consecutive slots from ``t.data_ptr()``."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def _same_order(a, b):
    """Two dense tensors of one shape map every index to the same memory offset."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _readable(t):
    """``t`` itself if its memory can be walked linearly, else a contiguous copy."""
    return t if _is_dense(t) else t.contiguous()


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


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(dtype):
    block = BLOCK_FP64 if dtype == torch.float64 else BLOCK
    block = min(block, CHUNK)
    if CHUNK % block or block & (block - 1):
        raise ValueError(f"fastreg triton backend: CHUNK={CHUNK} must be a multiple of a "
                         f"power-of-two BLOCK={block}")
    return dict(DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[_acc_dtype(dtype)], CHUNK=CHUNK,
                BLOCK=block, num_warps=NUM_WARPS)


def _finish(partials, nblocks, acc, device):
    out = torch.empty(2, dtype=acc, device=device)
    _finish_kernel[(1,)](partials, out, nblocks, BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return out


def _sums(params, device):
    dtype = params[0].dtype
    acc = _acc_dtype(dtype)
    views = [_readable(p) for p in params if p.numel()]
    if not views:
        return torch.zeros(2, dtype=acc, device=device)
    table = _param_table((tuple(v.data_ptr() for v in views),),
                         tuple(v.numel() for v in views), dtype, device, CHUNK)
    _use(table, device)
    partials = torch.empty(2 * table.nblocks, dtype=acc, device=device)
    _sums_kernel[(table.nblocks,)](table.operands[0], table.numels, table.block_map, partials,
                                   ALIGNED=table.aligned, **_config(dtype))
    return _finish(partials, table.nblocks, acc, device)


def _coeffs(coeffs, dtype, device):
    return coeffs.to(device=device, dtype=_acc_dtype(dtype)).contiguous()


def _grads(params, coeffs, device):
    dtype = params[0].dtype
    coeffs = _coeffs(coeffs, dtype, device)
    results = [torch.empty_like(p) for p in params]
    sources, targets, copy_back = [], [], []
    for p, out in zip(params, results):
        if not p.numel():
            continue
        src = _readable(p)
        dst = out
        if not _same_order(src, out):  # empty_like(p) may not share a non-dense p's order
            dst = torch.empty_like(src)
            copy_back.append((out, dst))
        sources.append(src)
        targets.append(dst)
    if not sources:
        return results
    table = _param_table((tuple(s.data_ptr() for s in sources),),
                         tuple(s.numel() for s in sources), dtype, device, CHUNK)
    outs = _out_table(tuple(d.data_ptr() for d in targets), device)
    _use(table, device)
    _use(outs, device)
    _grads_kernel[(table.nblocks,)](table.operands[0], outs.operands[0], table.numels,
                                    table.block_map, coeffs,
                                    ALIGNED=table.aligned and outs.aligned, **_config(dtype))
    for out, dst in copy_back:
        out.copy_(dst)
    return results


def _add_grad(params, grads_, coeffs, device):
    dtype = params[0].dtype
    acc = _acc_dtype(dtype)
    coeffs = _coeffs(coeffs, dtype, device)
    ws, gs, copy_back = [], [], []
    for p, g in zip(params, grads_):
        if not p.numel():
            continue
        if _is_dense(g):
            # Update g in place; read w in g's memory order (a copy only if orders differ).
            if _is_dense(p) and _same_order(p, g):
                w = p
            else:
                w = torch.empty_like(g)
                w.copy_(p)
            work = g
        else:
            # g cannot be walked linearly: update a contiguous copy, then write it back.
            w = p.contiguous()
            work = g.contiguous()
            copy_back.append((g, work))
        ws.append(w)
        gs.append(work)
    if not ws:
        return torch.zeros(2, dtype=acc, device=device)
    table = _param_table((tuple(w.data_ptr() for w in ws), tuple(g.data_ptr() for g in gs)),
                         tuple(w.numel() for w in ws), dtype, device, CHUNK)
    _use(table, device)
    partials = torch.empty(2 * table.nblocks, dtype=acc, device=device)
    _add_grad_kernel[(table.nblocks,)](table.operands[0], table.operands[1], table.numels,
                                       table.block_map, coeffs, partials,
                                       ALIGNED=table.aligned, **_config(dtype))
    for g, work in copy_back:
        g.copy_(work)
    return _finish(partials, table.nblocks, acc, device)


def _prox(params, coeffs, device):
    dtype = params[0].dtype
    coeffs = _coeffs(coeffs, dtype, device)
    works, copy_back = [], []
    for p in params:
        if not p.numel():
            continue
        if _is_dense(p):
            works.append(p)
        else:
            work = p.contiguous()
            works.append(work)
            copy_back.append((p, work))
    if not works:
        return None
    table = _param_table((tuple(w.data_ptr() for w in works),),
                         tuple(w.numel() for w in works), dtype, device, CHUNK)
    _use(table, device)
    _prox_kernel[(table.nblocks,)](table.operands[0], table.numels, table.block_map, coeffs,
                                   ALIGNED=table.aligned, F64=dtype == torch.float64,
                                   **_config(dtype))
    for p, work in copy_back:
        p.copy_(work)
    return None


# --------------------------------------------------------------------------------------
# The contract (fastreg/backends/__init__.py)
# --------------------------------------------------------------------------------------

def sums(params):
    device = _device_of(params)
    with _on(device):
        return _sums(params, device)


def grads(params, coeffs):
    device = _device_of(params)
    with _on(device):
        return _grads(params, coeffs, device)


def add_grad_(params, grads_, coeffs):
    device = _device_of(params)
    with _on(device):
        return _add_grad(params, grads_, coeffs, device)


def prox_(params, coeffs):
    device = _device_of(params)
    with _on(device):
        _prox(params, coeffs, device)
