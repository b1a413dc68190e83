"""The Triton backend's tuning constants: their one home.

Every module of the backend reads them here at call time (``tuning.BLOCK``), never a copy, so
setting an attribute of this module takes effect at the next call: tests shrink the tiles
(``monkeypatch.setattr(backend.tuning, "BLOCK", 256)``), ``python -m bench.gpu_check`` sweeps
``BLOCK`` / ``NUM_WARPS`` / ``MAX_CHUNK`` and ``python -m bench.host_overhead`` runs with them.
The tables cached in a workspace are keyed by the ones they depend on (``tables._tables``).
Not measured on a GPU yet: ``python -m bench.gpu_check`` sweeps them on the first GPU it runs on.
"""

import torch

BLOCK = 2048  # elements per tile for 2- and 4-byte dtypes (a power of two)
BLOCK_FP64 = 1024  # elements per tile for float64
NUM_WARPS = 8
MAX_CHUNK = 65536  # largest program (elements); a multiple of every tile
TARGET_PROGRAMS = 1024  # the chunk is the smallest power of two giving at most this many programs
RUN_TILE = 256  # RUNS mode: tile width along a run (BLOCK // RUN_TILE runs per tile)
RUN_LONG = 8  # runs of at least RUN_LONG * BLOCK elements (few, long groups) use a [1, BLOCK] tile
MIN_RUN = 64  # runs at least this long use RUNS mode, shorter ones ROWS
FINISH_TENSORS = 8  # tensors per _finish_kernel program
FINISH_BLOCK = 128  # partial pairs (and groups) per tensor per _finish_kernel iteration
FINISH_WARPS = 4
GROUP_BLOCK = 256  # groups per _group_sq_kernel program
GROUP_TILE = 512  # elements per tile of the metric step's one-program-per-group walk (group_block)
GROUP_TILE_FP64 = 1024
ALIGN_BYTES = 16
ENABLE_FP_FUSION = True  # set on every launch: see "Floating-point fusion" in launch.py


def block(dtype):
    """Elements per tile for ``dtype``."""
    return BLOCK_FP64 if dtype == torch.float64 else BLOCK


def group_block(dtype):
    """Elements per tile of the metric step's MODE_GROUP programs. A group's program carries its
    root-finding state beside the tile, and ptxas caps these at 80 registers: a tile of BLOCK
    spills on sm_80 and sm_90; these sizes compile without spills on both for every dtype
    pair (tests/backends/test_triton_compile.py checks them; float64 spills at 512, not 1024)."""
    return GROUP_TILE_FP64 if dtype == torch.float64 else GROUP_TILE


def vector(dtype):
    """Elements per ``ALIGN_BYTES`` (16 bytes: one 128-bit access)."""
    return ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
