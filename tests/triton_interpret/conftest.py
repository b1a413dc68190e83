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
