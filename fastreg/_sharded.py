"""Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them).

Each rank works on its local shards only (which may be empty). The value used in the loss
must be the global penalty, while each shard's gradient must be exactly its own penalty
gradient — not multiplied by the world size. So the value is

    all_reduce(counted local value).detach()  +  (own local value - own local value.detach())

whose forward is the global sum and whose backward is the local gradient. A replicated mesh
dimension holds the same data on every coordinate: only coordinate 0 is counted in the value,
but every replica gets the gradient, so replicas stay in sync. One all-reduce of a scalar per
mesh dimension is the only communication.
"""

import torch


def dtensor_type():
    """``DTensor`` if torch.distributed provides it here, else ``None``."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(tensor):
    cls = dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def check_placements(name, tensor):
    from torch.distributed.tensor import Partial

    if any(isinstance(p, Partial) for p in tensor.placements):
        raise ValueError(
            f"fastreg: parameter {name!r} has a Partial placement; a penalty of partial sums is "
            "meaningless — redistribute it to Shard or Replicate first"
        )


def is_counted(tensor):
    """Whether this rank's shard counts in the global value (coordinate 0 on replicated dims)."""
    from torch.distributed.tensor import Replicate

    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return False
    return all(c == 0 for c, p in zip(coordinate, tensor.placements) if isinstance(p, Replicate))


def all_reduce_sum(value, mesh):
    """The sum of a scalar over every rank of ``mesh`` (one all-reduce per mesh dimension)."""
    import torch.distributed._functional_collectives as funcol

    for dim in range(mesh.ndim):
        value = funcol.all_reduce(value, "sum", (mesh, dim) if mesh.ndim > 1 else mesh)
    return funcol.wait_tensor(value) if hasattr(funcol, "wait_tensor") else value
