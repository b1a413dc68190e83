"""torch.distributed: DDP replicas and DTensor-sharded parameters, 2 CPU processes over gloo.

Every check runs inside the workers against a single-process float64 reference built from the
same seed; a worker's failure fails the test with its traceback.
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastreg

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

WORLD = 2
L1, L2, LR = 1e-2, 5e-2, 0.1


def _run(worker, tmp_path):
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_entry, args=(worker, port), nprocs=WORLD, join=True)


def _entry(rank, worker, port):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only: no network is needed or wanted
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    worker(rank)
    # Every rank finishes its collectives before any rank tears gloo down: without this,
    # a rank that exits first can make its peer abort during teardown.
    dist.barrier()
    dist.destroy_process_group()
    # Skip C++ static destructors: on this torch, gloo's exit sometimes destroys a joinable
    # std::thread and aborts ("terminate called without an active exception") after every
    # check has passed. A failing check raises above and is reported by mp.spawn as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _reference_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1)).double()


def _ddp_worker(rank):
    inputs = torch.randn(16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    reference = _reference_mlp()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    loss = nn.functional.mse_loss(reference(inputs), targets) + fastreg.penalty(reference, l1=L1, l2=L2)
    loss.backward()
    ref_grads = [p.grad.clone() for p in reference.parameters()]
    ref_opt.step()

    model = nn.parallel.DistributedDataParallel(_reference_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    shard = slice(rank * 8, rank * 8 + 8)  # each replica sees half the batch
    loss = nn.functional.mse_loss(model(inputs[shard]), targets[shard]) + fastreg.penalty(model, l1=L1, l2=L2)
    loss.backward()  # DDP averages: mean of halves + the (identical) penalty gradient
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_ddp_replicas_get_the_single_process_gradient(tmp_path):
    _run(_ddp_worker, tmp_path)


# Uneven shards: 7 rows split 4/3, 1 row split 1/0 (an empty local shard), a 5-vector split 3/2.
SHAPES = {"w7x3": (7, 3), "w1x5": (1, 5), "v5": (5,), "replicated4x4": (4, 4)}


def _full_params():
    g = torch.Generator().manual_seed(4)
    return {name: torch.randn(*shape, dtype=torch.float64, generator=g) for name, shape in SHAPES.items()}


def _sharded_params(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    return {
        name: nn.Parameter(distribute_tensor(full, mesh, [Replicate() if name.startswith("replicated") else Shard(0)]))
        for name, full in _full_params().items()
    }


def _local_slice(param, full):
    """The part of the full tensor this rank's shard holds (Shard(0) on a 1-D mesh)."""
    from torch.distributed.tensor import Shard

    if not isinstance(param.placements[0], Shard):
        return full
    rows = -(-full.shape[0] // WORLD)  # torch.chunk semantics
    start = min(dist.get_rank() * rows, full.shape[0])
    return full[start:start + rows]


def _reference(full, l1, l2):
    value = sum(l1 * t.abs().sum() + l2 * t.square().sum() for t in full.values())
    grads = {name: l1 * torch.sign(t) + 2 * l2 * t for name, t in full.items()}
    return value, grads


def _dtensor_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    full = _full_params()
    ref_value, ref_grads = _reference(full, L1, L2)

    # Autograd mode: the global value, and each shard's own gradient (not x world size).
    params = _sharded_params(mesh)
    assert params["w1x5"].to_local().numel() == (5 if rank == 0 else 0)
    value = fastreg.penalty(list(params.items()), l1=L1, l2=L2)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    value.backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad.to_local(), _local_slice(p, ref_grads[name]), rtol=1e-12, atol=0)

    # add_to_grad_ and one optimizer step, against the single-process step.
    params = _sharded_params(mesh)
    reg = fastreg.Penalty(list(params.items()), l1=L1, l2=L2)
    torch.testing.assert_close(reg.add_to_grad_(), ref_value, rtol=1e-12, atol=0)
    torch.optim.SGD(params.values(), lr=LR).step()
    for name, p in params.items():
        expected = _local_slice(p, full[name] - LR * ref_grads[name])
        torch.testing.assert_close(p.to_local().detach(), expected, rtol=1e-12, atol=1e-15)

    # prox_ shard by shard, exact zeros included.
    params = _sharded_params(mesh)
    fastreg.Penalty(list(params.items()), l1=5.0, l2=L2).prox_(LR)
    for name, p in params.items():
        w = _local_slice(p, full[name])
        expected = torch.sign(w) * torch.clamp(w.abs() - LR * 5.0, min=0) / (1 + 2 * LR * L2)
        torch.testing.assert_close(p.to_local().detach(), expected, rtol=1e-15, atol=0)
        assert torch.equal(p.to_local() == 0, expected == 0)


def test_dtensor_sharded_parameters_value_gradient_step_and_prox(tmp_path):
    _run(_dtensor_worker, tmp_path)


def _fsdp_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inputs = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = _reference_mlp()
    loss = nn.functional.mse_loss(reference(inputs), targets) + fastreg.penalty(reference, l1=L1, l2=L2)
    loss.backward()

    model = _reference_mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    # Every rank sees the full batch, so FSDP's gradient average is the single-process gradient.
    loss = nn.functional.mse_loss(model(inputs), targets) + fastreg.penalty(model, l1=L1, l2=L2)
    torch.testing.assert_close(loss.detach(), nn.functional.mse_loss(reference(inputs), targets).detach()
                               + fastreg.penalty(reference, l1=L1, l2=L2).detach(), rtol=1e-12, atol=0)
    loss.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.to_local(), _local_slice(p, q.grad), rtol=1e-12, atol=1e-15)


def test_fsdp2_fully_shard(tmp_path):
    _run(_fsdp_worker, tmp_path)


# ------------------------------------------------------------------ the group term and centers

GROUP = 0.3


def _global_reference(full, l1, l2, group, group_dim, centers=None):
    """Value, gradients and prox of the whole (unsharded) tensors, in float64."""
    import reference as ref

    names = list(full)
    tensors = [full[n] for n in names]
    cs = None if centers is None else [centers[n] for n in names]
    value = ref.value(tensors, l1, l2, group, group_dim, cs)
    grads = {n: ref.grad(full[n], l1, l2, group, group_dim, None if cs is None else centers[n]) for n in names}
    prox = {n: ref.prox(full[n], LR, l1, l2, group, group_dim, None if cs is None else centers[n]) for n in names}
    return value, grads, prox


def _count_all_reduces(monkeypatch_target):
    """Wraps fastreg._dtensor.all_reduce_sum: how many calls (each one collective on a 1-D mesh)."""
    from fastreg import _dtensor

    calls = []
    original = _dtensor.all_reduce_sum

    def counting(value, mesh):
        calls.append(value.numel())
        return original(value, mesh)

    _dtensor.all_reduce_sum = counting
    return calls, lambda: setattr(_dtensor, "all_reduce_sum", original)


def _group_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    full = _full_params()
    l1, l2 = L1, L2
    for group_dim in (0, 1):
        ref_value, ref_grads, ref_prox = _global_reference(full, l1, l2, GROUP, group_dim)
        calls, restore = _count_all_reduces(None)
        try:
            # Autograd mode: the global value (group norms of columns span both shards for
            # group_dim=1) and each shard's own gradient, with the global norms.
            params = _sharded_params(mesh)
            value = fastreg.penalty(list(params.items()), l1=l1, l2=l2, group=GROUP, group_dim=group_dim)
            torch.testing.assert_close(value, torch.tensor(ref_value, dtype=torch.float64), rtol=1e-12, atol=0)
            value.backward()
            for name, p in params.items():
                torch.testing.assert_close(p.grad.to_local(), _local_slice(p, ref_grads[name]), rtol=1e-12,
                                           atol=1e-15, msg=f"{name}, group_dim={group_dim}")
            assert len(calls) == 1, calls  # one collective per mesh per call: value and group norms together

            params = _sharded_params(mesh)
            reg = fastreg.Penalty(list(params.items()), l1=l1, l2=l2, group=GROUP, group_dim=group_dim)
            del calls[:]
            torch.testing.assert_close(reg.add_to_grad_(), torch.tensor(ref_value, dtype=torch.float64), rtol=1e-12,
                                       atol=0)
            assert len(calls) == 1, calls
            for name, p in params.items():
                torch.testing.assert_close(p.grad.to_local(), _local_slice(p, ref_grads[name]), rtol=1e-12, atol=1e-15)

            params = _sharded_params(mesh)
            del calls[:]
            fastreg.Penalty(list(params.items()), l1=l1, l2=l2, group=GROUP, group_dim=group_dim).prox_(LR)
            assert len(calls) == (1 if group_dim == 1 else 0), calls  # rows live on one shard: no collective
            for name, p in params.items():
                expected = _local_slice(p, ref_prox[name])
                torch.testing.assert_close(p.to_local().detach(), expected, rtol=1e-13, atol=1e-15)
                assert torch.equal(p.to_local() == 0, expected == 0)
        finally:
            restore()
    # Whole groups to exact zero across shards: a large group threshold zeroes every column.
    params = _sharded_params(mesh)
    fastreg.Penalty(list(params.items()), group=100.0, group_dim=1).prox_(LR)
    for name, p in params.items():
        if p.ndim >= 2:
            assert (p.to_local() == 0).all(), name


def test_group_term_on_sharded_parameters_rows_and_columns(tmp_path):
    _run(_group_worker, tmp_path)


def _center_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    full = _full_params()
    g = torch.Generator().manual_seed(9)
    pretrained = {name: t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64) for name, t in full.items()}
    ref_value, ref_grads, ref_prox = _global_reference(full, L1, L2, GROUP, 1, pretrained)

    # A mapping of full-size tensors is sliced to each rank's shard.
    params = _sharded_params(mesh)
    reg = fastreg.Penalty(list(params.items()), l1=L1, l2=L2, group=GROUP, group_dim=1, center=pretrained)
    value = reg()
    torch.testing.assert_close(value, torch.tensor(ref_value, dtype=torch.float64), rtol=1e-12, atol=0)
    value.backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad.to_local(), _local_slice(p, ref_grads[name]), rtol=1e-12, atol=1e-15)
    reg.prox_(LR)
    for name, p in params.items():
        torch.testing.assert_close(p.to_local().detach(), _local_slice(p, ref_prox[name]), rtol=1e-12, atol=1e-15)

    # center="init" snapshots the local shards: right after construction the penalty is 0.
    params = _sharded_params(mesh)
    reg = fastreg.Penalty(list(params.items()), l2=1.0, center="init")
    assert reg().item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.to_local().add_(1.0)
    total = sum(t.numel() for t in full.values())
    torch.testing.assert_close(reg().item(), float(total), rtol=1e-12, atol=0)


def test_centers_on_sharded_parameters(tmp_path):
    _run(_center_worker, tmp_path)


def _settings_worker(rank):
    # Param groups over sharded parameters: each group's global value comes from the one
    # collective, and a constrained 1-D tensor is constrained as a whole across its shards.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    full = _full_params()
    names = sorted(full)
    first, rest = names[: len(names) // 2], names[len(names) // 2:]

    def groups(tensors):
        return [{"params": [(n, tensors[n]) for n in first], "l1": L1, "group": GROUP, "group_dim": 1},
                {"params": [(n, tensors[n]) for n in rest], "l2": L2, "group": GROUP / 2}]

    expected = {k: v.detach() for k, v in fastreg.Penalty(groups(full)).values().items()}
    params = _sharded_params(mesh)
    values = fastreg.Penalty(groups(params)).values()
    for key in expected:
        torch.testing.assert_close(values[key].detach(), expected[key], rtol=1e-12, atol=0)

    params = _sharded_params(mesh)
    vectors = [n for n in names if full[n].ndim == 1 and not n.startswith("replicated")]
    fastreg.Penalty([(n, params[n]) for n in vectors], unit_norm=True).prox_(LR)
    for n in vectors:
        local = params[n].to_local().detach()
        squared = local.square().sum()
        dist.all_reduce(squared)
        torch.testing.assert_close(squared.sqrt().item(), 1.0, rtol=1e-12, atol=0, msg=n)


def test_param_groups_and_constraints_on_sharded_parameters(tmp_path):
    _run(_settings_worker, tmp_path)


# ------------------------------------------------------------------ the step in a metric

# name: (shape, placement (Shard dim, or None: Replicate), param group). Param group 0 has
# column groups (group_dim=1), 1 row groups (group_dim=0), 2 blocks of 2 columns. Spanning
# shards: "cols_s0" (columns of a Shard(0) tensor), "rows_s1", "blocks_s0", "vec_s0" (no groups:
# max_norm on the whole vector), "cols_empty"; within a shard: "cols_s1", "rows_s0", "cols_rep".
# "rows_s0" and "cols_empty" split 1/0 (an empty local shard, whose columns still span).
METRIC_PARAMS = {"cols_s0": ((7, 4), 0, 0), "cols_s1": ((5, 6), 1, 0), "vec_s0": ((5,), 0, 0),
                 "cols_rep": ((3, 4), None, 0), "rows_s1": ((4, 5), 1, 1), "rows_s0": ((1, 5), 0, 1),
                 "blocks_s0": ((6, 4), 0, 2), "cols_empty": ((1, 4), 0, 0)}
METRIC_SETTINGS = [{"group_dim": 1, "l1": 0.3, "l2": 0.2, "group": 3.0, "max_norm": 1.2},
                   {"group_dim": 0, "l1": 0.3, "l2": 0.1, "group": 3.0, "max_norm": 0.9},
                   {"group_dim": 1, "group_size": 2, "l1": 0.3, "l2": 0.1, "group": 3.0, "max_norm": 1.0}]


def _metric_full(seed, positive=False, spec=METRIC_PARAMS):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _, _) in spec.items():
        if positive:
            out[name] = 0.5 + 2 * torch.rand(*shape, dtype=torch.float64, generator=g)
        else:  # groups of every scale: some exactly zero, some free, some at a norm bound
            t = torch.randn(*shape, dtype=torch.float64, generator=g)
            for dim, n in enumerate(shape):
                t = t * torch.linspace(0.1, 1.5, n, dtype=torch.float64).reshape([n] + [1] * (len(shape) - dim - 1))
            out[name] = t
    return out


def _distribute(full, mesh, spec=METRIC_PARAMS, parameter=True):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for name, t in full.items():
        dim = spec[name][1]
        d = distribute_tensor(t.clone(), mesh, [Replicate() if dim is None else Shard(dim)])
        out[name] = nn.Parameter(d) if parameter else d
    return out


def _metric_groups(tensors, spec=METRIC_PARAMS, settings=METRIC_SETTINGS):
    return [dict(s, params=[(n, t) for n, t in tensors.items() if spec[n][2] == k]) for k, s in enumerate(settings)]


def _assert_local(params, expected, rtol=1e-10, atol=1e-13, zeros=True):
    from fastreg import _dtensor

    for name, p in params.items():
        want = expected[name][_dtensor.local_slices(p)]
        torch.testing.assert_close(p.to_local().detach(), want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        if zeros:
            assert torch.equal(p.to_local() == 0, want == 0), name


def _metric_prox_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate

    from fastreg import _dtensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full, D = _metric_full(20), _metric_full(21, positive=True)
    # The metric of some parameters as a DTensor laid out as the parameter, of others as a plain
    # full tensor (each rank reads its part), one without (D = 1).
    given = {n: D[n] for n in ("cols_s1", "rows_s0", "blocks_s0")}
    given["cols_rep"] = None
    as_dtensors = ("cols_s0", "vec_s0", "rows_s1")
    reference = {n: nn.Parameter(t.clone()) for n, t in full.items()}
    fastreg.Penalty(_metric_groups(reference)).prox_(LR, metric={**{n: D[n] for n in as_dtensors}, **given})
    assert any((t == 0).any() for t in reference.values()) and any((t != 0).any() for t in reference.values())

    params = _distribute(full, mesh)
    dtensors = _distribute({n: D[n] for n in as_dtensors}, mesh, parameter=False)
    reg = fastreg.Penalty(_metric_groups(params))
    versions = {n: p._version for n, p in params.items()}
    reg.prox_(LR, metric={**dtensors, **given})
    _assert_local(params, {n: t.detach() for n, t in reference.items()})
    assert all(p._version > versions[n] for n, p in params.items())

    # Groups within shards only: the fused kernels on the local shards, no collective (a metric
    # given as DTensors would take one, the check that every shard of it is positive).
    within = {n: s for n, s in METRIC_PARAMS.items() if n in ("cols_s1", "rows_s0", "cols_rep")}
    reference = {n: nn.Parameter(full[n].clone()) for n in within}
    fastreg.Penalty(_metric_groups(reference, within)).prox_(LR, metric={n: D[n] for n in within})
    params = _distribute({n: full[n] for n in within}, mesh, within)
    calls, restore = _count_all_reduces(None)
    try:
        fastreg.Penalty(_metric_groups(params, within)).prox_(LR, metric={n: D[n] for n in within})
        assert calls == [], calls
    finally:
        restore()
    _assert_local(params, {n: t.detach() for n, t in reference.items()})

    # unit_norm (a lower bound: the non-convex case), with l2 and the group term; "hard" has, in
    # every row, y = 0 where D is smallest and ‖u/(a − min a)‖ < 1: the hard case, whose spread
    # lands on one rank (the row's argmin column) while the norm comes from both.
    spec = {"cols_s0": ((7, 4), 0, 0), "rows_s1": ((4, 5), 1, 1), "vec_s0": ((5,), 0, 0), "hard": ((4, 6), 1, 1),
            "cols_empty": ((1, 4), 0, 0)}
    settings = [{"group_dim": 1, "l2": 0.2, "group": 0.1, "unit_norm": True},
                {"group_dim": 0, "l2": 0.1, "unit_norm": True}]
    full, D = _metric_full(22, spec=spec), _metric_full(23, positive=True, spec=spec)
    full["hard"] = 0.01 * full["hard"]
    for r in range(4):
        full["hard"][r, r], D["hard"][r, r] = 0.0, 0.25
    reference = {n: nn.Parameter(t.clone()) for n, t in full.items()}
    fastreg.Penalty(_metric_groups(reference, spec, settings)).prox_(LR, metric=D)
    for r in range(4):
        assert reference["hard"][r, r] > 0  # the spread: the hard case was taken
    params = _distribute(full, mesh, spec)
    fastreg.Penalty(_metric_groups(params, spec, settings)).prox_(LR, metric=_distribute(D, mesh, spec, False))
    _assert_local(params, {n: t.detach() for n, t in reference.items()})

    # A DTensor metric laid out otherwise, or a plain one of the local shard's shape: an error
    # naming the parameter, on every rank.
    params = _distribute({"cols_s0": full["cols_s0"]}, mesh, spec)
    reg = fastreg.Penalty(_metric_groups(params, {"cols_s0": spec["cols_s0"]}, settings[:1]))
    replicated = torch.distributed.tensor.distribute_tensor(D["cols_s0"], mesh, [Replicate()])
    for bad in (replicated, D["cols_s0"][_dtensor.local_slices(params["cols_s0"])][:3]):
        with pytest.raises(ValueError, match="cols_s0"):
            reg.prox_(LR, metric={"cols_s0": bad})
    negative = _distribute({"cols_s0": torch.where(torch.arange(7)[:, None] == 6, -1.0, D["cols_s0"])}, mesh, spec,
                           parameter=False)  # bad on rank 1's shard only
    with pytest.raises(ValueError, match="cols_s0.*positive"):
        reg.prox_(LR, metric=negative)


def test_metric_prox_on_sharded_parameters(tmp_path):
    _run(_metric_prox_worker, tmp_path)


def _metric_attach_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    full = _metric_full(30)
    grads = [_metric_full(31 + step) for step in range(3)]

    def train(params, shard):
        opt = torch.optim.Adam(params.values(), lr=0.05)
        reg = fastreg.Penalty(_metric_groups(params))
        reg.attach(opt, mode="prox")
        for g in grads:
            for name, p in params.items():
                p.grad = shard(name, p, g[name])
            opt.step()
        return params

    reference = train({n: nn.Parameter(t.clone()) for n, t in full.items()}, lambda n, p, g: g.clone())
    params = train(_distribute(full, mesh),
                   lambda n, p, g: distribute_tensor(g.clone(), mesh, p.placements))
    expected = {n: t.detach() for n, t in reference.items()}
    assert any((t == 0).any() for t in expected.values())
    _assert_local(params, expected)


def test_attach_adam_prox_on_sharded_parameters(tmp_path):
    _run(_metric_attach_worker, tmp_path)
