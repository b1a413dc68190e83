"""The Triton backend under the Triton interpreter (``TRITON_INTERPRET=1``), on CPU tensors.

The variable must be set before anything imports triton (tests/conftest.py already imports
every backend), so this directory runs in its own pytest process, with the variable set on
the command line::

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpret

Without the variable this directory is not collected (tests/conftest.py ignores it too), and
asking for it explicitly is a usage error rather than a run of zero tests. Nothing here
changes the environment: a main process must not switch triton to the interpreter behind
the back of tests that run on a GPU.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_USAGE = "run `TRITON_INTERPRET=1 python -m pytest tests/triton_interpret` in its own process"

collect_ignore = []


def _asked_for_explicitly(config):
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        if _asked_for_explicitly(config):
            raise pytest.UsageError(f"tests/triton_interpret needs TRITON_INTERPRET=1: {_USAGE}")
        collect_ignore.append("test_triton_backend.py")
        return
    backend = sys.modules.get("fastreg.backends.triton")
    if backend is not None and not backend._INTERPRET:
        raise pytest.UsageError(f"fastreg.backends.triton was imported without the interpreter: {_USAGE}")


@pytest.fixture
def backend():
    """Here every contract and API test runs on the Triton backend only (CPU tensors)."""
    return "triton"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles and chunks small enough that test-sized tensors cross every boundary, and a
    program count target that makes the chunk vary with the call's size."""
    from fastreg import _dispatch

    tuning = _dispatch.backend("triton").tuning  # where every module of the backend reads them
    for name, value in (("BLOCK", 256), ("BLOCK_FP64", 128), ("MAX_CHUNK", 1024), ("TARGET_PROGRAMS", 64),
                        ("RUN_TILE", 32), ("MIN_RUN", 16), ("GROUP_BLOCK", 16), ("FINISH_BLOCK", 16)):
        monkeypatch.setattr(tuning, name, value)
    yield
    torch.set_num_threads(torch.get_num_threads())


# fp16 takes the code paths of bf16 (a 16-bit dtype, fp32 accumulation) with another constexpr;
# under the interpreter, the group and center contract tests run for fp32, bf16 and fp64 only.
SLOW_UNDER_INTERPRETER = ("test_sums_with_groups", "test_sums_of_shrunk_values", "test_grads_with_groups_and_centers",
                          "test_add_grad_with_groups_and_centers", "test_prox_with_groups_and_centers")


def pytest_collection_modifyitems(config, items):
    deselected = [item for item in items if getattr(item, "originalname", None) in SLOW_UNDER_INTERPRETER
                  and "torch.float16" in item.name]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
