"""fastreg.sparsity: exact-zero counts, checked against an independent count in plain Python."""

import json
import math

import pytest
import torch
from torch import nn

import fastreg
from fastreg._sparsity import ParameterSparsity, Sparsity, sparsity


def python_zeros(t):
    """Exact zeros, counted element by element on the host (no torch reductions)."""
    return sum(1 for v in t.detach().cpu().double().flatten().tolist() if v == 0.0)


def sparse_tensor(shape, fraction, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < fraction] = 0
    return t


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 3))
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            p.copy_(sparse_tensor(p.shape, 0.1 + 0.2 * i, seed=i))
    return m


def check_against_python(result, named):
    assert [row.name for row in result.per_parameter] == [name for name, _ in named]
    for row, (name, t) in zip(result.per_parameter, named):
        assert row.numel == t.numel()
        assert row.zeros == python_zeros(t)
        assert row.fraction == (row.zeros / row.numel if row.numel else 0.0)
    assert result.zeros == sum(python_zeros(t) for _, t in named)
    assert result.numel == sum(t.numel() for _, t in named)
    assert math.isclose(result.total_fraction, result.zeros / result.numel)


def test_module_matches_independent_count():
    m = model()
    result = sparsity(m)
    check_against_python(result, list(m.named_parameters()))
    assert result.excluded == []
    assert 0 < result.zeros < result.numel


def test_after_prox_matches_independent_count():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    fastreg.Penalty(m, l1=1.0).prox_(0.05)  # threshold 0.05: a part of the weights become 0
    result = sparsity(m)
    check_against_python(result, list(m.named_parameters()))
    assert result.zeros > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    tensors = [sparse_tensor((5, 6), 0.4, seed=s, dtype=dtype) for s in range(3)]
    result = sparsity(tensors)
    check_against_python(result, [(f"[{i}]", t) for i, t in enumerate(tensors)])


def test_params_forms_give_the_same_counts():
    m = model()
    named = list(m.named_parameters())
    by_module = sparsity(m)
    by_pairs = sparsity(named)
    by_dict = sparsity(dict(named))
    by_tensors = sparsity([t for _, t in named])
    for other in (by_pairs, by_dict):
        assert other.per_parameter == by_module.per_parameter
    assert [r[1:] for r in by_tensors.per_parameter] == [r[1:] for r in by_module.per_parameter]
    assert [r.name for r in by_tensors.per_parameter] == [f"[{i}]" for i in range(len(named))]
    single = sparsity(named[0][1])
    assert single.per_parameter == [ParameterSparsity("[0]", *by_module.per_parameter[0][1:])]


def test_exclude_forms_and_frozen():
    m = model()
    m[0].bias.requires_grad_(False)
    result = sparsity(m, exclude="bias_and_norm")
    assert [r.name for r in result.per_parameter] == ["0.weight", "3.weight"]
    assert [name for name, _ in result.excluded] == ["0.bias", "1.weight", "1.bias", "3.bias"]
    assert dict(result.excluded)["0.bias"] == "requires_grad=False"
    check_against_python(result, [("0.weight", m[0].weight), ("3.weight", m[3].weight)])

    by_glob = sparsity(m, exclude=["1.*"])
    assert [r.name for r in by_glob.per_parameter] == ["0.weight", "3.weight", "3.bias"]
    by_callable = sparsity(m, exclude=lambda name, t: t.shape[0] == 3)
    assert [r.name for r in by_callable.per_parameter] == ["0.weight", "1.weight", "1.bias"]
    # the same selection as a penalty over the same arguments
    reg = fastreg.Penalty(m, l2=1.0, exclude="bias_and_norm")
    assert [name for name, _ in reg.named_parameters()] == [r.name for r in result.per_parameter]


def test_edge_values_and_layouts():
    t = torch.tensor([0.0, -0.0, 1e-45, -1e-38, float("nan"), float("inf"), 3.0, 0.0])
    result = sparsity([("t", t)])
    assert result.zeros == 3  # 0.0, -0.0, 0.0; a denormal, a NaN and an inf are not zeros
    base = sparse_tensor((9, 11), 0.5, seed=3)
    views = [("transposed", base.t()), ("strided", base[::2, 1::3]), ("empty", torch.empty(0, 4)),
             ("scalar", torch.tensor(0.0))]
    check_against_python(sparsity(views), views)
    empty = sparsity([("e", torch.empty(0))])
    assert (empty.zeros, empty.numel, empty.total_fraction) == (0, 0, 0.0)
    assert empty.per_parameter[0].fraction == 0.0


def test_nothing_selected():
    result = sparsity([])
    assert (result.zeros, result.numel, result.total_fraction, result.per_parameter) == (0, 0, 0.0, [])
    assert "total" in result.table()


def test_shared_parameter_counted_once():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    with torch.no_grad():
        lin.weight[0] = 0
    result = sparsity(m)
    assert [r.name for r in result.per_parameter] == ["0.weight", "0.bias"]
    assert result.zeros == 4 + python_zeros(lin.bias)


def test_requires_grad_tensors_and_no_autograd_side_effects():
    w = sparse_tensor((4, 4), 0.5, seed=5).requires_grad_()
    result = sparsity([w])
    assert result.zeros == python_zeros(w)
    assert w.grad is None


def test_integer_tensor_is_rejected_like_penalty():
    with pytest.raises(TypeError, match="int64"):
        sparsity([torch.zeros(3, dtype=torch.int64)])


def test_table_and_data():
    m = model()
    result = sparsity(m, exclude=["1.*"])
    assert isinstance(result, Sparsity)
    text = str(result)
    assert text == result.table()
    lines = text.splitlines()
    assert lines[0].split() == ["parameter", "elements", "zeros", "zero", "fraction"]
    for row in result.per_parameter:
        line = next(line for line in lines if line.startswith(row.name + " "))
        assert line.split() == [row.name, f"{row.numel:,}", f"{row.zeros:,}", f"{100 * row.fraction:.2f}%"]
    total = next(line for line in lines if line.startswith("total "))
    assert total.split()[1:3] == [f"{result.numel:,}", f"{result.zeros:,}"]
    assert len({len(line) for line in lines if not line.startswith("not counted")}) == 1  # aligned
    assert "not counted: 2 tensors" in text and "1.weight" in text

    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["zeros"] == result.zeros and data["numel"] == result.numel
    assert data["total_fraction"] == result.total_fraction
    assert data["per_parameter"][0] == {"name": "0.weight", "numel": 91, "zeros": result.per_parameter[0].zeros,
                                        "fraction": result.per_parameter[0].fraction}
    assert data["excluded"] == [{"name": "1.weight", "reason": "matches '1.*'"},
                                {"name": "1.bias", "reason": "matches '1.*'"}]
    name, numel, zeros, fraction = result.per_parameter[0]  # rows unpack as tuples
    assert (name, numel) == ("0.weight", 91)


def test_many_excluded_are_summarised():
    tensors = {f"p{i}": torch.zeros(2, requires_grad=False) for i in range(10)}
    m = nn.Module()
    for name, t in tensors.items():
        m.register_parameter(name, nn.Parameter(t, requires_grad=False))
    text = sparsity(m).table()
    assert "not counted: 10 tensors" in text and "6 more in .excluded" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_mixed_devices():
    cpu = sparse_tensor((33, 7), 0.3, seed=7)
    gpu = sparse_tensor((1000, 3), 0.6, seed=8).cuda()
    named = [("cpu", cpu), ("gpu", gpu), ("gpu_half", gpu.half())]
    check_against_python(sparsity(named), named)
