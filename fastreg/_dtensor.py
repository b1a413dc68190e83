"""DTensor helpers (FSDP2's ``fully_shard`` parameters): what a plan needs to know about a
sharded parameter, and the collectives. The maths of sharded penalties is in ``_sharded``."""


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


def local(tensor):
    """The local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_placements(name, tensor, group_dim, group_size=1):
    from torch.distributed.tensor import Partial, Shard

    if any(isinstance(p, Partial) for p in tensor.placements):
        raise ValueError(
            f"fastreg: parameter {name!r} has a Partial placement; a penalty of partial sums is "
            "meaningless — redistribute it to Shard or Replicate first"
        )
    if group_dim >= 0 and tensor.ndim >= 1:
        dims = {p.dim % tensor.ndim for p in tensor.placements if isinstance(p, Shard)}
        if group_dim in dims and len(dims) > 1:
            raise NotImplementedError(
                f"fastreg: parameter {name!r} is sharded along its group dimension {group_dim} and along "
                f"dimension(s) {sorted(dims - {group_dim})}; the group term supports sharding along one of them"
            )
        if group_dim in dims and group_size > 1:
            per_rank = tensor.shape[group_dim]
            for p, size in zip(tensor.placements, tensor.device_mesh.shape):  # nested chunks (strided sharding)
                if isinstance(p, Shard) and p.dim % tensor.ndim == group_dim:
                    per_rank = -(-per_rank // size)
            if per_rank % group_size:
                raise NotImplementedError(
                    f"fastreg: parameter {name!r} is sharded along its group dimension {group_dim} in pieces of "
                    f"{per_rank}, which group_size={group_size} does not divide: a block would span ranks"
                )


def groups_span_ranks(tensor, group_dim):
    """Whether a group of this parameter has elements on several ranks (Shard of another dim;
    any Shard for a whole-tensor group)."""
    from torch.distributed.tensor import Shard

    if group_dim == -1 or (group_dim >= 0 and tensor.ndim < 1):
        return False
    return any(isinstance(p, Shard) and (group_dim < 0 or p.dim % tensor.ndim != group_dim) and size > 1
               for p, size in zip(tensor.placements, tensor.device_mesh.shape))


def is_counted(tensor):
    """Whether this rank's shard counts in the global value (coordinate 0 on replicated dims)."""
    from torch.distributed.tensor import Replicate

    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return False
    return all(c == 0 for c, p in zip(coordinate, tensor.placements) if isinstance(p, Replicate))


def local_slices(tensor):
    """The index of this rank's shard in the full tensor (a tuple of slices)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def all_reduce_sum(value, mesh):
    """The sum of a tensor over every rank of ``mesh`` (one all-reduce per mesh dimension)."""
    return all_reduce(value, mesh, "sum")


def all_reduce(value, mesh, op):
    """``value`` combined over every rank of ``mesh`` by ``op`` (``"sum"``, ``"min"``, ``"max"``;
    one all-reduce per mesh dimension); every rank gets the same result."""
    import torch.distributed._functional_collectives as funcol

    for dim in range(mesh.ndim):
        value = funcol.all_reduce(value, op, (mesh, dim) if mesh.ndim > 1 else mesh)
    return funcol.wait_tensor(value) if hasattr(funcol, "wait_tensor") else value


def same_placement(a, b):
    """Whether two DTensors are laid out alike: one mesh, the same placements and global shape."""
    return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements) and a.shape == b.shape
