import os

import pytest
import torch

import fastreg
from fastreg import _dispatch

# The Triton interpreter suite needs TRITON_INTERPRET=1 before triton is imported, so it runs
# in its own pytest process (see README / .ci/run).
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton_interpret"]

BACKENDS = fastreg.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available backend; every contract and API test runs on each of them.

    Tests create tensors on torch's default device, so a backend that cannot take CPU
    tensors (triton) gets its own device type as the default for the test.
    """
    device_types = _dispatch.backend(request.param).DEVICE_TYPES
    if device_types is None or "cpu" in device_types:
        yield request.param
        return
    with torch.device(device_types[0]):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
