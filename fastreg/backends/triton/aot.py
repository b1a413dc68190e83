"""The ahead-of-time compile list: every kernel specialization the backend can launch.

``launch_configs()`` lists them, with the current tuning constants, for
``tests/backends/test_triton_compile.py``, which compiles each one for sm_80 / sm_90 with
Triton's own ptxas (no GPU needed) and checks that it spills nothing. The interpreter suite
checks that every launch a call makes is in the list, so a new constexpr or mode in the
launchers (``launch.py``) needs its values here too.
"""

import torch

from fastreg.backends._geometry import acc_dtype

from . import kernels, tuning
from .kernels import _TL_DTYPES, MODE_FLAT, MODE_GROUP, MODE_ROWS, MODE_RUNS, OP_ADD_GRAD, OP_GRADS, OP_PROX

MODE_NAMES = {MODE_FLAT: "flat", MODE_RUNS: "runs", MODE_ROWS: "rows", MODE_GROUP: "group"}  # in the names


def launch_configs():
    """Every specialization ``sums`` / ``grads`` / ``add_grad_`` / ``prox_`` can launch with the
    current tuning constants, as ``(name, kernel, signature, constexprs, options)`` for an
    ahead-of-time compile (``triton.compile(ASTSource(kernel, signature, constexprs), ...)``):
    each dtype, mode and tile, aligned and unaligned, with and without centers and
    shrinking (sums of the shrunk values), every gradient dtype, the stage-2 kernels, and the
    step in a metric for every dtype of the metric tensors (flat, aligned and not, and a program
    per group). Used by tests/backends/test_triton_compile.py."""
    configs = []
    options = dict(num_warps=tuning.NUM_WARPS, enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    finish_options = dict(num_warps=tuning.FINISH_WARPS, enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    for dtype in _TL_DTYPES:
        acc = acc_dtype(dtype)
        block = tuning.block(dtype)
        acc_ptr = "*fp64" if acc == torch.float64 else "*fp32"
        tables = {"w_ptrs": "*i64", "c_ptrs": "*i64", "info": "*i64", "meta": "*i64"}
        for mode, run_tile in ((MODE_FLAT, block), (MODE_RUNS, min(tuning.RUN_TILE, block)), (MODE_RUNS, block),
                               (MODE_ROWS, block)):
            for aligned in (True, False):
                common = dict(DTYPE=_TL_DTYPES[dtype], ACC=_TL_DTYPES[acc], MODE=mode, ALIGNED=aligned, BLOCK=block,
                              RUN_TILE=run_tile, VEC=tuning.vector(dtype))
                tag = f"{str(dtype)[6:]}-{MODE_NAMES[mode]}{run_tile if mode == MODE_RUNS else ''}-" \
                      f"{'aligned' if aligned else 'unaligned'}"
                for center in (False, True):
                    for shrink in (False, True):
                        signature = dict(tables, partials=acc_ptr, slots=acc_ptr, shrink=acc_ptr, chunk="i64")
                        constexprs = dict(common, HAS_CENTER=center, SHRINK=shrink)
                        configs.append((f"sums-{tag}{'-centered' if center else ''}{'-shrunk' if shrink else ''}",
                                        kernels._sums_kernel, signature, constexprs, options))
                ops = [(OP_GRADS, dtype, "grads"), (OP_PROX, dtype, "prox")] + \
                      [(OP_ADD_GRAD, g, f"add_grad-{str(g)[6:]}") for g in _TL_DTYPES]
                for (op, out_dtype, name), center in ((o, c) for o in ops for c in (False, True)):
                    promote = torch.float64 if torch.float64 in (acc, out_dtype) else torch.float32
                    signature = dict(tables, out_ptrs="*i64", coeffs=acc_ptr, group_coef=acc_ptr, partials=acc_ptr,
                                     chunk="i64")
                    constexprs = dict(common, OUT_DTYPE=_TL_DTYPES[out_dtype], PROMOTE=_TL_DTYPES[promote], OP=op,
                                      HAS_CENTER=center, REDUCE=bool(op == OP_ADD_GRAD and mode == MODE_FLAT),
                                      F64=acc == torch.float64)
                    configs.append((f"{name}-{tag}{'-centered' if center else ''}", kernels._elementwise_kernel,
                                    signature, constexprs, options))
        configs += _metric_configs(dtype, options)
    for acc_ptr in ("*fp32", "*fp64"):
        configs.append((f"group_sq-{acc_ptr[1:]}", kernels._group_sq_kernel,
                        dict(slots=acc_ptr, ginfo="*i64", gmap="*i64", group_sq=acc_ptr),
                        dict(GROUP_BLOCK=tuning.GROUP_BLOCK), finish_options))
        configs.append((f"finish-{acc_ptr[1:]}", kernels._finish_kernel,
                        dict(partials=acc_ptr, group_sq=acc_ptr, finfo="*i64", ntensors="i64", out=acc_ptr),
                        dict(TENSORS=tuning.FINISH_TENSORS, BLOCK=tuning.FINISH_BLOCK), finish_options))
    return configs


def _metric_configs(dtype, options):
    """``_metric_prox_kernel`` for ``dtype`` params: every dtype of the metric tensors (an
    optimizer's state may be kept in another one), the flat mode aligned or not, the mode of a
    program per group (never aligned), with and without centers."""
    acc = acc_dtype(dtype)
    acc_ptr = "*fp64" if acc == torch.float64 else "*fp32"
    signature = {"w_ptrs": "*i64", "c_ptrs": "*i64", "v_ptrs": "*i64", "m_ptrs": "*i64", "info": "*i64",
                 "meta": "*i64", "tensor_of": "*i64", "coeffs": acc_ptr, "metric": acc_ptr, "chunk": "i64"}
    configs = []
    for v_dtype in _TL_DTYPES:
        for mode, aligned in ((MODE_FLAT, True), (MODE_FLAT, False), (MODE_GROUP, False)):
            for center in (False, True):
                constexprs = {"DTYPE": _TL_DTYPES[dtype], "V_DTYPE": _TL_DTYPES[v_dtype], "ACC": _TL_DTYPES[acc],
                              "MODE": mode, "HAS_CENTER": center, "ALIGNED": aligned,
                              "BLOCK": tuning.group_block(dtype) if mode == MODE_GROUP else tuning.block(dtype),
                              "VEC": tuning.vector(dtype), "F64": acc == torch.float64}
                alignment = ("-aligned" if aligned else "-unaligned") if mode == MODE_FLAT else ""
                name = f"metric_prox-{str(dtype)[6:]}-v{str(v_dtype)[6:]}-{MODE_NAMES[mode]}{alignment}"
                configs.append((name + ("-centered" if center else ""), kernels._metric_prox_kernel, signature,
                                constexprs, options))
    return configs
