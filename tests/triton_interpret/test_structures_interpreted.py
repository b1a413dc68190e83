"""The per-tensor operands suite (tests/backends/test_structures.py), run on the Triton backend
under the interpreter (see conftest.py: the ``backend`` fixture is "triton" only here, and tiles
and chunks are shrunk). The interpreter runs each program in Python, so the long tensor is
scaled down with the tiles: it still crosses the chunk."""

import backends.test_structures as structures

structures.LONG = 1500  # still longer than the shrunk 1024-element chunk

from backends.test_structures import *  # noqa: E402,F401,F403  (the structures tests, collected here)
