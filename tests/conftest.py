import os

import pytest
import torch

import fastreg

# The Triton interpreter suite needs TRITON_INTERPRET=1 before triton is imported, so it runs
# in its own pytest process (see README / .ci/run).
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["triton_interpret"]

BACKENDS = fastreg.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available backend; every contract and API test runs on each of them."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
