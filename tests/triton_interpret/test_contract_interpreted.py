"""The backend contract suite (tests/backends/test_contract.py), run on the Triton backend under
the interpreter (see conftest.py: the ``backend`` fixture is "triton" only here, and tiles and
chunks are shrunk). The interpreter runs each program in Python, so the sizes are scaled down
with the tiles: every case still crosses tile, chunk, program and window boundaries."""

import backends.test_contract as contract

contract.LONG = 1500  # still longer than the shrunk 1024-element chunk
contract.MANY = 200
contract.WIDE = 300  # wider than the shrunk 256-element tile
contract.TALL = 140  # a strided-group tensor of 140 rows: 35 programs of 4 rows
contract.VOCAB, contract.COLUMN = 3000, 300
# (conftest.py deselects the fp16 variants of the slowest group and center tests.)

from backends.test_contract import *  # noqa: E402,F401,F403  (the contract tests, collected here)
