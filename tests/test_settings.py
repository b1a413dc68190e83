"""fastreg._settings and the recipes it enables: param groups (the torch.optim way), rules by
name, structures (blocks, whole tensors, couplings), constraints, per-group values, the
``no_weight_decay`` preset — every setting in one Penalty, checked against float64 references
written here in plain torch."""

import math

import pytest
import torch
from torch import nn

import fastreg


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)


def _blocks(w, dim, size):
    """Group norms of blocks of ``size`` rows / columns, in float64."""
    x = w.detach().double().movedim(dim, 0)
    return x.reshape(x.shape[0] // size, -1).norm(dim=1)


def _reference(model, groups):
    """Σ over param groups of l1·Σ|d| + l2·Σd² + group·Σ‖d_g‖ (``groups``: (names, l1, l2, group,
    dim, size)), in float64 plain torch."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for names, l1, l2, group, dim, size in groups:
        for name in names:
            w = params[name].double()
            total = total + l1 * w.abs().sum() + l2 * w.square().sum()
            if group and dim is None:
                total = total + group * w.norm()
            elif group and w.ndim >= 2:
                x = w.movedim(dim, 0)
                total = total + group * x.reshape(x.shape[0] // size, -1).norm(dim=1).sum()
    return total


# ------------------------------------------------------------------------------------------
# Param groups, rules, values


def test_param_groups_give_each_parameter_its_own_settings(backend):
    model = _mlp()
    reg = fastreg.Penalty([{"params": model[0].parameters(), "l2": 0.3, "group": 0.2},
                           {"params": model[2].parameters(), "l1": 0.1}], l2=0.05, backend=backend)
    expected = _reference(model, [(["0.weight", "0.bias"], 0.0, 0.3, 0.2, 0, 1),
                                  (["2.weight", "2.bias"], 0.1, 0.05, 0.0, 0, 1)])
    value = reg()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    values = reg.values()
    assert list(values) == [0, 1]
    torch.testing.assert_close(values[0] + values[1], value, rtol=1e-12, atol=0)
    # gradients equal plain autograd of the reference
    value.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _reference(model, [(["0.weight", "0.bias"], 0.0, 0.3, 0.2, 0, 1),
                       (["2.weight", "2.bias"], 0.1, 0.05, 0.0, 0, 1)]).backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-15)


def test_rules_by_name_first_match_wins_and_values_are_keyed_by_selector(backend):
    model = _mlp()
    rules = [("2.*", {"l2": 0.5}), (["*.bias", "nothing"], {"l1": 0.2, "l2": 0.0}),
             (lambda name, t: t.ndim == 2, {"group": 0.1, "group_dim": 1})]
    reg = fastreg.Penalty(model, l2=0.01, rules=rules, backend=backend)
    expected = _reference(model, [(["2.weight", "2.bias"], 0.0, 0.5, 0.0, 0, 1), (["0.bias"], 0.2, 0.0, 0.0, 0, 1),
                                  (["0.weight"], 0.0, 0.01, 0.1, 1, 1)])
    torch.testing.assert_close(reg(), expected, rtol=1e-12, atol=0)
    keys = list(reg.values())
    assert keys[:2] == ["2.*", ("*.bias", "nothing")] and callable(keys[2]) and keys[3] == 3
    assert [len(g["params"]) for g in reg.param_groups] == [2, 1, 1, 0]
    table = reg.explain()
    assert "rule '2.*'" in table and "9 (columns)" not in table and "6 (columns)" in table


def test_a_param_group_coefficient_changed_between_steps_takes_effect(backend):
    model = _mlp()
    reg = fastreg.Penalty([{"params": model[0].parameters()}, {"params": model[2].parameters()}], l2=0.1,
                          backend=backend)
    before = reg().item()
    reg.param_groups[1]["l2"] = 0.0
    after = reg().item()
    expected = _reference(model, [(["0.weight", "0.bias"], 0.0, 0.1, 0.0, 0, 1)]).item()
    assert after == pytest.approx(expected, rel=1e-12) and before > after
    reg.param_groups[0]["group_dim"] = 1
    with pytest.raises(ValueError, match="group_dim of param group 0 changed"):
        reg()


def test_add_to_grad_and_prox_with_param_groups_match_the_reference(backend):
    model = _mlp()
    groups = [{"params": [model[0].weight], "l1": 0.05, "group": 0.3}, {"params": [model[2].weight], "l2": 0.2},
              {"params": [model[0].bias, model[2].bias], "l1": 0.5}]
    reg = fastreg.Penalty(groups, backend=backend)
    value = reg.add_to_grad_()
    reference = fastreg.Penalty(groups, backend="torch")
    torch.testing.assert_close(value, reference().detach(), rtol=1e-12, atol=0)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference().backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-15)
    # prox_: each group's own closed form
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    reg.prox_(0.5)
    s = torch.sign(w0) * (w0.abs() - 0.025).clamp(min=0)
    n = s.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model[0].weight.detach(), s * (1 - 0.15 / n).clamp(min=0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(model[0].bias.detach(), torch.sign(b0) * (b0.abs() - 0.25).clamp(min=0), rtol=1e-12,
                               atol=0)


def test_bad_param_groups_are_errors_naming_them():
    model = _mlp()
    with pytest.raises(ValueError, match="param group 1 has unknown keys"):
        fastreg.Penalty([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    with pytest.raises(ValueError, match=r"l2 \(param group 1\) must be finite"):
        fastreg.Penalty([{"params": model[0].parameters()}, {"params": model[2].parameters(), "l2": -1.0}])
    with pytest.raises(ValueError, match="is in param group 0 and in param group 1"):
        fastreg.Penalty([{"params": [model[0].weight]}, {"params": [model[0].weight]}])
    with pytest.raises(ValueError, match="has 8 rows, which group_size=3 does not divide"):
        fastreg.Penalty(model, group=0.1, group_size=3)
    with pytest.raises(TypeError, match="rules select parameters of one nn.Module"):
        fastreg.Penalty(list(model.parameters()), rules=[("*", {})])


def test_no_weight_decay_preset_reads_timm_declarations():
    class Vit(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.randn(1, 5, 4))
            self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
            self.proj = nn.Linear(4, 4)
            self.relative_position_bias_table = nn.Parameter(torch.randn(3, 2))

        def no_weight_decay(self):
            return {"pos_embed", "cls_token"}

        def no_weight_decay_keywords(self):
            return {"relative_position_bias_table"}

    reg = fastreg.Penalty(Vit(), l2=0.1, exclude="no_weight_decay")
    assert [n for n, _ in reg.named_parameters()] == ["proj.weight", "proj.bias"]
    assert "no_weight_decay (model.no_weight_decay())" in reg.explain()
    with pytest.raises(ValueError, match="defines neither"):
        fastreg.Penalty(_mlp(), l2=0.1, exclude=["no_weight_decay"])


# ------------------------------------------------------------------------------------------
# Structures


@pytest.mark.parametrize("dim", [0, 1])
def test_blocks_of_rows_or_columns_are_the_groups(backend, dim):
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(12, 9, dtype=torch.float64))
    size = 3
    reg = fastreg.Penalty([("qkv", w)], group=0.7, group_dim=dim, group_size=size, backend=backend)
    torch.testing.assert_close(reg(), 0.7 * _blocks(w, dim, size).sum(), rtol=1e-12, atol=0)
    reg().backward()
    x = w.detach().movedim(dim, 0)
    blocks = x.reshape(x.shape[0] // size, -1)
    expected = (0.7 * blocks / blocks.norm(dim=1, keepdim=True)).reshape(x.shape).movedim(0, dim)
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-15)
    assert f"{w.shape[dim] // size} (blocks of 3 {'rows' if dim == 0 else 'columns'})" in reg.explain()


def test_whole_tensor_groups(backend):
    model = _mlp()
    reg = fastreg.Penalty(model, group=0.4, group_dim=None, backend=backend)
    expected = 0.4 * sum(p.detach().norm() for p in model.parameters())
    torch.testing.assert_close(reg(), expected, rtol=1e-12, atol=0)
    with torch.no_grad():
        model[2].bias.mul_(1e-3)  # a tensor whose norm is under lr·group is zeroed whole
    reg.prox_(0.5)
    assert torch.equal(model[2].bias, torch.zeros_like(model[2].bias))
    assert model[0].weight.abs().sum() > 0


def test_a_coupled_neuron_group_spans_a_row_a_bias_and_a_column(backend):
    model = _mlp()
    coupled = [[("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]]
    reg = fastreg.Penalty(model, group=0.3, coupled=coupled, backend=backend)
    w1, b1, w2 = model[0].weight.double(), model[0].bias.double(), model[2].weight.double()
    neurons = torch.cat([w1, b1[:, None], w2.t()], dim=1)  # one row per hidden unit: the concatenated matrix
    expected = 0.3 * neurons.norm(dim=1).sum() + 0.3 * w2.new_zeros(())  # 2.bias: no groups
    torch.testing.assert_close(reg(), expected, rtol=1e-12, atol=0)
    reg().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected.backward()
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, torch.zeros_like(a) if p.grad is None else p.grad, rtol=1e-12, atol=1e-15)
    model.zero_grad()
    torch.testing.assert_close(reg.add_to_grad_(), expected.detach(), rtol=1e-12, atol=0)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-15)
    assert "coupled #0" in reg.explain()


def test_couplings_are_checked():
    model = _mlp()
    with pytest.raises(ValueError, match="unequal counts"):
        fastreg.Penalty(model, group=0.1, coupled=[[("0.weight", 0), ("2.weight", 0)]])
    with pytest.raises(ValueError, match="is not a regularized parameter"):
        fastreg.Penalty(model, group=0.1, coupled=[[("0.weight", 0), ("3.weight", 1)]])
    with pytest.raises(ValueError, match="belongs to one coupling"):
        fastreg.Penalty(model, group=0.1, coupled=[[("0.weight", 0), ("0.bias", 0)], [("0.weight", 0)]])


def test_coupled_prox_within_proximal_gradient_reaches_the_concatenated_problem(backend):
    # min ½‖X·[W1ᵀ | b1 | W2]… ‖² is awkward; instead: min_x f(x) + λ Σ_i ‖x_i‖ where x_i is
    # neuron i's row, its bias and its column, written once as a concatenated matrix (plain
    # torch, proximal gradient by hand) and once as three tensors under one coupled Penalty.
    torch.manual_seed(3)
    target = torch.randn(8, 6 + 1 + 4, dtype=torch.float64)
    target[2:5] *= 0.05  # neurons the penalty should remove
    lam, lr, steps = 0.5, 0.5, 300

    x = torch.zeros_like(target)
    for _ in range(steps):  # f(x) = ½‖x − target‖², prox of the row group lasso
        y = x - lr * (x - target)
        x = y * (1 - lr * lam / y.norm(dim=1, keepdim=True)).clamp(min=0)

    w1 = torch.zeros(8, 6, dtype=torch.float64)
    b1 = torch.zeros(8, dtype=torch.float64)
    w2 = torch.zeros(4, 8, dtype=torch.float64)
    reg = fastreg.Penalty([("w1", w1), ("b1", b1), ("w2", w2)], group=lam,
                          coupled=[[("w1", 0), ("b1", 0), ("w2", 1)]], backend=backend)
    for _ in range(steps):
        with torch.no_grad():
            w1 -= lr * (w1 - target[:, :6])
            b1 -= lr * (b1 - target[:, 6])
            w2 -= lr * (w2 - target[:, 7:].t())
        reg.prox_(lr)
    got = torch.cat([w1, b1[:, None], w2.t()], dim=1)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)
    removed = (got == 0).all(dim=1)
    assert removed[2:5].all() and not removed[[0, 1, 5, 6, 7]].any()


# ------------------------------------------------------------------------------------------
# Constraints


def test_constraints_are_applied_by_prox_and_add_nothing_to_the_value(backend):
    torch.manual_seed(2)
    w = torch.randn(6, 5, dtype=torch.float64) * 3
    v = torch.randn(6, 5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) * 3
    reg = fastreg.Penalty([{"params": [("w", w)], "max_norm": 2.0}, {"params": [("v", v)], "nonneg": True},
                           {"params": [("b", b)], "unit_norm": True}], backend=backend)
    assert reg().item() == 0.0
    w0, v0, b0 = w.clone(), v.clone(), b.clone()
    reg.prox_(0.1)
    norms = w0.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w, w0 * (2.0 / norms).clamp(max=1), rtol=1e-12, atol=0)  # inside the ball: unchanged
    assert torch.equal(v, v0.clamp(min=0))
    torch.testing.assert_close(b, b0 / b0.norm(), rtol=1e-12, atol=0)  # a 1-D tensor: the whole tensor
    text = reg.explain()
    assert "max_norm=2" in text and "nonneg" in text and "norm in [1, 1]" in text and "add nothing" in text


def test_inconsistent_constraints_are_errors_naming_the_group():
    model = _mlp()
    with pytest.raises(ValueError, match="leave no feasible norm"):
        fastreg.Penalty(model, max_norm=0.5, unit_norm=True)
    with pytest.raises(ValueError, match="lower norm bound .* with l1"):
        fastreg.Penalty([{"params": model.parameters(), "l1": 0.1, "min_max_norm": (0.5, 1.0)}])
    with pytest.raises(ValueError, match="min_max_norm .* has min 2.0 > max 1.0"):
        fastreg.Penalty(model, min_max_norm=(2.0, 1.0))


# ------------------------------------------------------------------------------------------
# L2-SP in one Penalty, and attach


def test_l2_sp_body_toward_pretrained_head_toward_zero_each_value_logged(backend):
    model = _mlp()
    # A param group's names are its own params' (a submodule's are relative to it).
    pretrained = {k: v.clone() for k, v in model[0].state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    reg = fastreg.Penalty([{"params": model[0], "l2": 0.01, "center": pretrained},
                           {"params": model[2], "l2": 0.5}], backend=backend)
    values = reg.values()
    body = 0.01 * sum((p.detach() - pretrained[n]).square().sum() for n, p in model[0].named_parameters())
    head = 0.5 * sum(p.detach().square().sum() for p in model[2].parameters())
    torch.testing.assert_close(values[0], body, rtol=1e-12, atol=0)
    torch.testing.assert_close(values[1], head, rtol=1e-12, atol=0)


def test_attach_gives_each_groups_value(backend):
    model = _mlp()
    reg = fastreg.Penalty([{"params": model[0].parameters(), "l2": 0.1}, {"params": model[2].parameters(),
                                                                        "l1": 0.01}], backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reg.attach(optimizer)
    model(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    expected = {k: v.detach() for k, v in reg.values().items()}
    optimizer.step()
    assert handle.last_values.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(handle.last_values[k], expected[k], rtol=1e-12, atol=0)
    assert math.isclose(handle.last_value.item(), sum(v.item() for v in expected.values()), rel_tol=1e-12)


# ------------------------------------------------------------------------------------------
# gradcheck, torch.compile


def test_gradcheck_and_gradgradcheck_with_param_groups_blocks_and_couplings(backend):
    torch.manual_seed(5)
    params = [torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(6, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 3, dtype=torch.float64, requires_grad=True)]
    groups = [{"params": [("a", params[0]), ("b", params[1]), ("c", params[2])], "l2": 0.3, "group": 0.2},
              {"params": [("d", params[3])], "l1": 0.1, "group": 0.5, "group_dim": 1, "group_size": 3}]

    def fn(*tensors):
        reg = fastreg.Penalty([dict(g, params=[(n, t) for (n, _), t in zip(g["params"], ts)])
                               for g, ts in zip(groups, (tensors[:3], tensors[3:]))],
                              coupled=[[("a", 0), ("b", 0), ("c", 1)]], backend=backend)
        return reg()

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_compile_fullgraph_with_per_group_tensor_coefficients_never_recompiles(backend):
    model = _mlp(torch.float32)
    a, b = torch.tensor(0.1), torch.tensor(0.2)
    reg = fastreg.Penalty([{"params": model[0].parameters(), "l2": a, "group": b},
                           {"params": model[2].parameters(), "l1": b, "group_dim": None, "group": a}],
                          backend=backend)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda: reg(), backend=counting, fullgraph=True)
    for x, y in ((0.1, 0.2), (0.3, 0.05), (0.0, 0.4)):
        a.fill_(x)
        b.fill_(y)
        expected = _reference(model, [(["0.weight", "0.bias"], 0.0, x, y, 0, 1),
                                      (["2.weight", "2.bias"], y, 0.0, x, None, 1)])
        torch.testing.assert_close(step().double(), expected, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1
    torch._dynamo.reset()


def test_sparsity_of_a_penalty_counts_each_structure_and_each_coupling():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[2:5] = 0
        model[0].bias[2:5] = 0
        model[2].weight[:, 2:4] = 0  # neuron 4's column is still live
    reg = fastreg.Penalty(model, group=0.1, coupled=[[("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]])
    report = fastreg.sparsity(reg)
    coupled = [row for row in report.per_group if row.name.startswith("coupled #0")]
    assert [(row.groups, row.zero_groups) for row in coupled] == [(8, 2)]
    assert "2 of 8" in str(report)
    blocks = fastreg.sparsity(fastreg.Penalty(model, group=0.1, group_size=2))
    assert {row.name: (row.groups, row.zero_groups) for row in blocks.per_group} == {"0.weight": (4, 1),
                                                                                     "2.weight": (2, 0)}


def test_a_center_mapping_that_names_no_parameter_warns():
    model = _mlp()
    with pytest.warns(UserWarning, match="names none of the regularized parameters"):
        fastreg.Penalty([{"params": model[2], "l2": 0.1, "center": {"2.weight": model[2].weight.detach()}}])


# ------------------------------------------------------------------------------------------
# What a demanding user runs into (each found in review)


def test_a_coupling_across_param_groups_needs_one_l2_and_one_norm_bound():
    a, b = torch.ones(3, 1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    groups = [{"params": [("a", a)], "l1": 0.1}, {"params": [("b", b)], "l2": 1.0}]
    with pytest.raises(ValueError, match=r"coupled\[0\] joins parameters of param group 0 and param group 1"):
        fastreg.Penalty(groups, group=0.5, coupled=[[("a", 0), ("b", 1)]])
    groups[1]["l2"] = 0.0  # one l2 (l1 may differ: it acts per element)
    reg = fastreg.Penalty(groups, group=0.5, coupled=[[("a", 0), ("b", 1)]])
    reg.prox_(1.0)
    s = torch.full((3,), 0.9, dtype=torch.float64)  # a's l1 shrinks its slice; b's is 1
    norms = (s.square() + 1).sqrt()
    torch.testing.assert_close(a[:, 0], s * (1 - 0.5 / norms), rtol=1e-12, atol=0)


def test_coupled_names_held_by_several_param_groups_are_an_error():
    model = _mlp()
    with pytest.raises(ValueError, match="several param groups hold"):
        fastreg.Penalty([{"params": model[0]}, {"params": model[2]}], group=0.1, coupled=[[("weight", 0)]])


def test_a_coupled_parameter_may_change_dtype():
    model = _mlp()
    coupled = [[("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]]
    reg = fastreg.Penalty(model, group=0.3, coupled=coupled)
    model[2].bias.data = model[2].bias.data.float()
    model[0].bias.data = model[0].bias.data.float()
    w1, b1, w2 = (p.detach().double() for p in (model[0].weight, model[0].bias, model[2].weight))
    expected = 0.3 * torch.cat([w1, b1[:, None], w2.t()], dim=1).norm(dim=1).sum()
    torch.testing.assert_close(reg().double(), expected, rtol=1e-6, atol=0)


def test_param_groups_are_fixed_except_their_coefficients():
    model = _mlp()
    reg = fastreg.Penalty([{"params": [model[0].weight]}, {"params": [model[2].weight], "l2": 0.0}], l2=0.1)
    with pytest.raises(AttributeError, match="different l2"):
        reg.l2 = 0.05  # would make the no-decay group decay
    reg.param_groups[0]["params"].append(model[0].bias)
    with pytest.raises(ValueError, match="params of param group 0 changed"):
        reg()
    reg.param_groups[0]["params"].pop()
    reg.param_groups.append({"params": [model[2].bias], "l2": 0.1})
    with pytest.raises(ValueError, match="built with 2 param groups and now has 3"):
        reg()


def test_a_sequence_center_aligns_with_the_module_under_rules():
    model = _mlp()
    centers = [p.detach() + 1 for p in model.parameters()]
    reg = fastreg.Penalty(model, l2=0.1, center=centers, rules=[("2.*", {"l2": 0.2})])
    expected = sum((0.2 if n.startswith("2.") else 0.1) * 1.0 * p.numel() for n, p in model.named_parameters())
    torch.testing.assert_close(reg().item(), expected, rtol=1e-12, atol=0)


def test_constraints_take_python_numbers_and_selectors_are_unique():
    model = _mlp()
    with pytest.raises(TypeError, match="must be a Python number"):
        fastreg.Penalty(model, max_norm=torch.tensor(1.0))
    with pytest.raises(ValueError, match="same selector"):
        fastreg.Penalty(model, rules=[("0.*", {"l2": 0.1}), ("0.*", {"l1": 0.1})])


def test_explain_shows_a_constrained_bias_as_one_whole_group():
    model = _mlp()
    text = fastreg.Penalty(model, unit_norm=True).explain()
    assert "1 (whole tensor)" in text and "none (ndim < 2)" not in text


def test_fuzz_findings_float32_tensor_coefficients_and_user_mistakes():
    # A float32 0-dim coefficient must not round float64 parameters' proximal step to float32.
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    l2 = torch.tensor(0.6133)
    fastreg.Penalty([w], l2=l2).prox_(0.1)
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) / (1 + 2 * 0.1 * l2.double())
    torch.testing.assert_close(w, expected, rtol=1e-15, atol=0)
    model = _mlp()
    with pytest.raises(TypeError, match="list of such lists"):
        fastreg.Penalty(model, group=0.1, coupled=[("0.weight", 0), ("0.bias", 0)])
    reg = fastreg.Penalty(model, l2=0.1)
    reg.param_groups[0]["weight_decay"] = 1.0  # a typo must not be a silent no-op
    with pytest.raises(ValueError, match=r"unknown keys \['weight_decay'\]"):
        reg()
