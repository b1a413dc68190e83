"""Every Triton kernel specialization the backend can launch, compiled ahead of time for real
GPUs (sm_80: A100, sm_90: H100/H200) with Triton's own ptxas, no GPU needed.

For each one: it compiles; it spills nothing (``cuobjdump -res-usage``: STACK 0, LOCAL 0); and
the aligned fp32 / bf16 variants of the flat (ungrouped) mode use 128-bit loads
(``ld.global.v4``; the metric step's too, with fp32 / bf16 metric tensors) — the vectorisation
the backend's alignment bookkeeping exists for. A kernel that would not compile on an H100 fails
CI here, in the normal test run.

    python -m pytest -m gpu_compile          # just these

The compilations run in a process pool (one per core) once per session; each specialization
is then its own test. Triton caches compiled kernels (``~/.triton/cache``), so reruns are fast.
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="the gpu_compile checks need triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter process does not compile kernels", allow_module_level=True)

from fastreg.backends import triton as backend  # noqa: E402

pytestmark = pytest.mark.gpu_compile

TARGETS = {"sm_80": 80, "sm_90": 90}
CONFIGS = {name: (kernel, signature, constexprs, options)
           for name, kernel, signature, constexprs, options in backend.launch_configs()}


def _cuobjdump():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _compile_one(name, arch):
    """(name, arch, result dict) for one specialization: compiled in a worker process."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastreg.backends import triton as module

    kernel, signature, constexprs, options = {n: (k, s, c, o) for n, k, s, c, o in module.launch_configs()}[name]
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    except Exception as exc:  # reported by the test, with the compiler's message
        return name, arch, {"error": f"{type(exc).__name__}: {exc}"[:4000]}
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin.name], capture_output=True, text=True,
                               timeout=120).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return name, arch, {"usage": usage, "registers": int(fields.get("REG", -1)),
                        "stack": int(fields.get("STACK", -1)), "local": int(fields.get("LOCAL", -1)),
                        "v4_loads": ptx.count("ld.global.v4"), "ptx_loops": ptx.count("bra.uni")}


@pytest.fixture(scope="session")
def compiled():
    """Every (specialization, target), compiled in parallel once."""
    if _cuobjdump() is None:
        pytest.fail("cuobjdump not found (triton ships one in triton/backends/nvidia/bin)")
    jobs = [(name, arch) for name in CONFIGS for arch in TARGETS.values()]
    results = {}
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for name, arch, result in pool.map(_compile_one, *zip(*jobs), chunksize=8):
            results[(name, arch)] = result
    return results


def test_every_kernel_is_covered():
    kernels = {kernel.fn.__name__ for kernel, _, _, _ in CONFIGS.values()}
    launched = {name for name in dir(backend.kernels) if name.endswith("_kernel") and not name.startswith("__")}
    assert kernels == launched, (kernels, launched)
    for mode in ("flat", "runs", "rows"):
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            for alignment in ("aligned", "unaligned"):
                assert any(name.startswith(f"sums-{dtype}-{mode}") and alignment in name for name in CONFIGS)


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiles_without_spills(compiled, name, arch):
    result = compiled[(name, TARGETS[arch])]
    assert "error" not in result, result.get("error")
    assert result["stack"] == 0 and result["local"] == 0, f"register spills: {result['usage']}"
    assert 0 < result["registers"] <= 255


FLAT_ALIGNED_VECTORISED = [name for name in CONFIGS
                           if re.match(r"(sums|grads|add_grad-\w+|prox)-(float32|bfloat16)-flat-aligned", name)
                           or re.match(r"metric_prox-(float32|bfloat16)-v(float32|bfloat16)-flat-aligned", name)]


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("name", FLAT_ALIGNED_VECTORISED)
def test_aligned_flat_variants_use_128_bit_loads(compiled, name, arch):
    result = compiled[(name, TARGETS[arch])]
    assert "error" not in result, result.get("error")
    assert result["v4_loads"] > 0, f"{name} on {arch}: no ld.global.v4 in the PTX"


def test_unaligned_variants_do_not_claim_alignment(compiled):
    # The unaligned flat fp32 sums must not vectorise: a 128-bit load of a misaligned pointer faults.
    assert compiled[("sums-float32-flat-unaligned", 90)]["v4_loads"] == 0
