"""``python -m bench.host_overhead``: the Triton backend's host time per call, without a GPU.

On a GPU the kernels run asynchronously, so what a call costs the training loop's thread is its
host work: Python, building or looking up tables, allocating outputs, launching. Here the kernels
are replaced by no-ops (``kernel[grid](...)`` does nothing) and the backend runs on CPU tensors
(``TRITON_INTERPRET=1`` makes it accept them; nothing is interpreted), so what is timed is exactly
that host work, per call, for the contract's four calls on the benchmark's parameter shapes.

The calls pass a ``Workspace``, as a ``Penalty``'s kernel group does, so what is timed is the
steady state: the parameters' tables found in the workspace (the last column counts the tables
built and found over the run), each call's own per-call work (the targets' pointer table of
``grads`` and ``add_grad_``, outputs, buffers) included.

    python -m bench.host_overhead                      # GPT-2 shapes, 200 x 1000 and 2000 x 1000
    python -m bench.host_overhead --module old.py      # another version of the backend, side by side
    python -m bench.host_overhead --module old/triton  # the same, for a version that is a package

(``--module``: a single-file version, such as ``git show REV:fastreg/backends/triton.py > old.py``
for one from before the backend became the package ``fastreg/backends/triton/``, or a copy of
that package's folder, such as ``git archive REV fastreg/backends/triton | tar -x -C old``. A
file with an older contract, ``sums(params)``, ``grads(params, coeffs)``, is timed with those
signatures.) The GPU benchmark reports the same host time, measured, beside each row.

The slope lines split each call's time into a constant and a part per tensor, from the two
cases of equal tensors (200 x 1000 and 2000 x 1000): ``(t_2000 - t_200) / 1800`` µs a tensor.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors are accepted

import torch  # noqa: E402

from bench.cases import CASES_BY_NAME, Case, _many_small_shapes, make_params  # noqa: E402
from fastreg.backends._workspace import Workspace  # noqa: E402


# Host time only: the same small tensors as "many-small", ten times fewer (for the slope).
_CASES = {**CASES_BY_NAME, "many-small-200": Case("many-small-200", "200 x 1000", _many_small_shapes(200), False)}
_SLOPE = ("many-small-200", "many-small")  # (fewer, more) tensors of one shape


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def load(path=None):
    """The backend (this one, or the version at ``path``: a file or a package folder), with its
    kernels stubbed."""
    if path is None:
        from fastreg.backends import triton as module
    else:
        name, locations = "fastreg_triton_under_test", None
        if os.path.isdir(path):  # a package: its modules import each other relatively
            locations, path = [path], os.path.join(path, "__init__.py")
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # for the package's relative imports
        spec.loader.exec_module(module)
    kernels = getattr(module, "kernels", None) or module  # the package's kernels module, or the single file
    for name in [n for n in dir(kernels) if n.endswith("_kernel")]:
        setattr(kernels, name, _NoLaunch())
    return module


def calls(module, params, workspace):
    """The four contract calls, in whichever signature the module has (``workspace`` passed to a
    module that takes one)."""
    grads = [torch.zeros_like(p) for p in params]
    new = "centers" in module.sums.__code__.co_varnames
    if new:
        c3 = torch.tensor([0.0, 1e-4, 0.0])
        ws = dict(workspace=workspace) if "workspace" in module.sums.__code__.co_varnames else {}
        return {"sums": lambda: module.sums(params, None, -1, **ws),
                "grads": lambda: module.grads(params, None, -1, c3, None, **ws),
                "add_grad_": lambda: module.add_grad_(params, grads, None, -1, c3, None, **ws),
                "prox_": lambda: module.prox_(params, None, -1, c3, None, **ws)}
    c2 = torch.tensor([0.0, 1e-4])
    return {"sums": lambda: module.sums(params), "grads": lambda: module.grads(params, c2),
            "add_grad_": lambda: module.add_grad_(params, grads, c2), "prox_": lambda: module.prox_(params, c2)}


def time_us(fn, repeats):
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt2,many-small-200,many-small")
    parser.add_argument("--module", help="another version of the Triton backend to time beside this one: a file "
                        "(fastreg/backends/triton.py before it was a package) or a copy of fastreg/backends/triton/")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    modules = {"this": load()}
    if args.module:
        modules[os.path.basename(args.module)] = load(args.module)
    lines = ["| case | backend | " + " | ".join(f"{c} µs" for c in ("sums", "grads", "add_grad_", "prox_"))
             + " | tables built / found |", "|---|---|---:|---:|---:|---:|---|"]
    medians = {}  # (case, backend) -> µs per call
    for name in args.cases.split(","):
        case = _CASES[name.strip()]
        # Only the shapes matter (no kernel runs): small tensors keep the host's memory free.
        params = [torch.empty(shape) for _, shape in case.shapes] if case.num_elements > 5e7 else \
            [p.detach() for p in make_params(case, torch.float32, "cpu", 0)]
        for label, module in modules.items():
            if hasattr(module, "cache_clear"):
                module.cache_clear()
            workspace = Workspace()
            row = [f"{case.title} ({case.num_tensors} tensors)", label]
            for call, fn in calls(module, params, workspace).items():
                medians[case.name, label, call] = time_us(fn, args.repeats)
                row.append(f"{medians[case.name, label, call]:.0f}")
            uses = "workspace" in module.sums.__code__.co_varnames
            row.append(f"{workspace.builds} / {workspace.hits}" if uses else "(its own cache)")
            lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    few, many = (_CASES[name] for name in _SLOPE)
    for label in modules:
        if all((name, label, "sums") in medians for name in _SLOPE):
            per = {call: (medians[many.name, label, call] - medians[few.name, label, call])
                   / (many.num_tensors - few.num_tensors) for call in ("sums", "grads", "add_grad_", "prox_")}
            print(f"{label}: µs per tensor ({few.title} -> {many.title}): "
                  + ", ".join(f"{call} {value:.3f}" for call, value in per.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
