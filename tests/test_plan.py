"""fastreg._plan: the plan built once per Penalty: its kernel groups, its checks (overlapping
memory), restricted plans, and following parameters replaced under it."""

import pytest
import torch
from torch import nn

import fastreg
import reference as ref
from fastreg import _settings
from fastreg._plan import Plan


def _plan(params, center=None):
    return Plan(_settings.param_groups(params, _settings.defaults(center=center)), None, "auto")


# --------------------------------------------------------------------------- kernel groups

def test_kernel_groups_by_device_dtype_and_center():
    params = [("a", torch.randn(3, 4)), ("b", torch.randn(5, dtype=torch.float64)), ("c", torch.randn(2, 2)),
              ("d", torch.randn(7, dtype=torch.float16))]
    plan = _plan(params, {"c": torch.zeros(2, 2)})
    groups = {(kg.dtype, kg.centers is not None): kg.names for kg in plan.kernel_groups()}
    assert groups == {(torch.float32, False): ["a"], (torch.float64, False): ["b"], (torch.float32, True): ["c"],
                      (torch.float16, False): ["d"]}
    assert plan.result_dtype == torch.float64
    assert all(kg.workspace is not None for kg in plan.kernel_groups())
    assert len({id(kg.workspace) for kg in plan.kernel_groups()}) == 4  # one each: never shared


def test_a_restricted_plan_has_its_own_groups_and_workspaces():
    params = [("a", torch.randn(3, 4)), ("b", torch.randn(5)), ("c", torch.randn(2, 2))]
    plan = _plan(params, "init")
    sub = plan.restricted(lambda t: t is params[1][1])
    assert sub.names == ["b"] and [kg.names for kg in sub.kernel_groups()] == [["b"]]
    assert sub.kernel_groups()[0].workspace is not plan.kernel_groups()[0].workspace
    assert sub.centers[0] is plan.centers[1]  # the same stored center, not a copy
    assert plan.names == ["a", "b", "c"]  # the parent is unchanged


def test_current_regroups_only_when_a_dtype_or_device_changed():
    lin = nn.Linear(3, 2)
    plan = _plan(lin)
    groups = plan.local
    assert plan.current().local is groups  # nothing changed: the same groups
    lin.weight.data = torch.randn(5, 3)  # a new shape without a center: the kernels read shapes
    assert plan.current().local is groups
    lin.bias.data = lin.bias.data.double()
    regrouped = plan.current().local
    assert regrouped is not groups and sorted(str(kg.dtype) for kg in regrouped) == ["torch.float32",
                                                                                     "torch.float64"]


@pytest.fixture
def cpu_loaded():
    from fastreg.backends import cpu
    if cpu.unavailable_reason() is not None:
        pytest.skip("the C++ CPU backend is not built")


@pytest.mark.parametrize("change", ["dtype", "shape-of-a-grouped-tensor", "indivisible-shape", "same-layout"])
def test_the_compiled_layout_check_follows_what_the_python_one_does(cpu_loaded, change):
    # Once a call found the layout unchanged, Plan.current checks it in one C++ call
    # (csrc/operands.cpp Layout); the kernels read the bound operands (cpu._operands) as they are.
    lin = nn.Linear(4, 4).double()
    reg = fastreg.Penalty(lin, l2=0.5, group=0.25, group_size=2, backend="cpu")
    reg(), reg.add_to_grad_()
    assert reg._plan._layout_changed is not None  # the compiled check is the one in use
    groups = reg._plan.local
    if change == "dtype":
        lin.bias.data = lin.bias.data.float()
    elif change == "shape-of-a-grouped-tensor":
        lin.weight.data = torch.randn(6, 4, dtype=torch.float64)
    elif change == "indivisible-shape":
        lin.weight.data = torch.randn(5, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"'weight' changed shape to \(5, 4\), which its group_size 2"):
            reg()
        return
    else:
        lin.weight.data = torch.randn(4, 4, dtype=torch.float64)  # the same TensorImpl, new storage
    value = reg()
    assert (reg._plan.local is groups) == (change == "same-layout")
    fresh = fastreg.Penalty(lin, l2=0.5, group=0.25, group_size=2, backend="torch")()
    torch.testing.assert_close(value.double(), fresh.double(), rtol=1e-6 if change == "dtype" else 1e-13, atol=0)
    lin.zero_grad(set_to_none=True)
    reg.add_to_grad_()
    assert lin.weight.grad.shape == lin.weight.shape and lin.bias.grad.dtype == lin.bias.dtype
    torch.testing.assert_close(lin.bias.grad, lin.bias.detach(), rtol=0, atol=0)  # 2·0.5·b, bias ungrouped


# --------------------------------------------------------------------------- overlapping memory

def test_two_views_of_the_same_memory_are_rejected_naming_both():
    w = nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"parameters 'a' and 'b' share memory"):
        fastreg.Penalty([("a", w), ("b", w.view(-1))], l2=1.0)
    flat = torch.randn(100)
    with pytest.raises(ValueError, match=r"'\[0\]' and '\[1\]' share memory"):
        fastreg.Penalty([flat[:60], flat[50:]], l2=1.0)  # overlapping slices of one buffer


def test_distinct_views_of_one_buffer_are_fine():
    # A flat parameter cut into pieces (FSDP1-style), and interleaved strided views.
    flat = torch.randn(100)
    pieces = [flat[:30].view(5, 6), flat[30:31], flat[31:100]]
    reg = fastreg.Penalty(pieces, l2=1.0)
    torch.testing.assert_close(reg().item(), ref.value(pieces, 0, 1.0), rtol=1e-6, atol=0)
    base = torch.randn(8, 10)
    reg = fastreg.Penalty([base[:, ::2], base[:, 1::2]], l2=1.0)
    torch.testing.assert_close(reg().item(), (base.double() ** 2).sum().item(), rtol=1e-6, atol=0)


def test_tied_weights_from_a_state_dict_are_rejected_not_counted_twice():
    # state_dict() gives two tensor objects for a tied weight: they share memory.
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    with pytest.raises(ValueError, match="share memory"):
        fastreg.Penalty(model.state_dict(keep_vars=False), l2=1.0)
    assert len(fastreg.Penalty(model, l2=1.0).named_parameters()) == 1  # the module: counted once


def test_prox_refuses_a_parameter_whose_elements_share_memory():
    w = torch.randn(1, 5).expand(3, 5)
    reg = fastreg.Penalty([w], l1=1.0)
    reg()  # reading it is fine
    with pytest.raises(ValueError, match="elements that share memory"):
        reg.prox_(0.1)


# --------------------------------------------------------------------------- per-call state


def _penalty(**settings):
    return fastreg.Penalty(nn.Linear(4, 3), backend="torch", **settings)


def test_coefficients_and_call_are_reused_while_nothing_changed():
    reg = _penalty(l2=1e-2)
    first = reg._plan.coefficients()
    assert reg._plan.coefficients() is first
    assert reg._plan.call(first, "grad") is reg._plan.call(first, "grad")
    reg.l2 = 2e-2
    again = reg._plan.coefficients()
    assert again is not first and again[0].l2 == 2e-2
    assert reg._plan.call(again, "grad")[0][1][0, 1] == 2e-2


@pytest.mark.parametrize("setter", ["property", "item", "update", "setdefault_after_del"])
@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_a_bad_coefficient_is_an_error_however_it_is_set(setter, bad):
    reg = _penalty(l2=1e-2)
    reg()  # the checked state is cached now
    group = reg.param_groups[0]
    if setter == "property":
        with pytest.raises(ValueError, match="l2"):
            reg.l2 = bad
        return
    if setter == "item":
        group["l2"] = bad
    elif setter == "update":
        group.update(l2=bad)
    else:
        del group["l2"]
        group.setdefault("l2", bad)
    for call in (reg, reg.add_to_grad_, lambda: reg.prox_(0.1), reg.values):
        with pytest.raises(ValueError, match="l2"):
            call()


def test_values_that_can_change_in_place_are_checked_at_every_call():
    l1 = torch.tensor(1e-2)
    bounds = [0.0, 2.0]
    reg = _penalty(l1=l1, max_norm=None)
    reg.param_groups[0]["min_max_norm"] = bounds
    reg()
    l1.fill_(float("nan"))  # a tensor coefficient changed in place
    with pytest.raises(ValueError, match="l1"):
        reg()
    l1.fill_(1e-2)
    reg.l1 = 0.0
    reg.prox_(0.1)
    bounds[0] = 3.0  # a list mutated in place
    with pytest.raises(ValueError, match="min_max_norm"):
        reg.prox_(0.1)


def test_a_structure_change_is_still_an_error_after_cached_calls():
    reg = _penalty(l2=1e-2)
    reg()
    reg.param_groups[0]["group_dim"] = 1
    with pytest.raises(ValueError, match="group_dim"):
        reg()
    reg.param_groups[0]["group_dim"] = 0
    reg.param_groups[0]["params"].append(torch.zeros(2, requires_grad=True))  # the same list, longer
    with pytest.raises(ValueError, match="params"):
        reg()


def test_the_coefficients_handed_out_are_the_callers_to_edit():
    """``Penalty.coefficients()`` is a copy: editing it changes nothing the penalty computes."""
    w = torch.ones(3, dtype=torch.float64)
    reg = fastreg.Penalty([("w", w)], l2=1.0)
    handed = reg.coefficients()
    handed[0] = handed[0]._replace(l2=-100.0)
    assert reg.coefficients()[0].l2 == 1.0
    assert reg().item() == 3.0 and reg.values()[0].item() == 3.0


def test_a_param_group_that_computes_its_values_is_read_at_every_call():
    """A dict subclass may return a new value on each read (a schedule): never cached."""

    class Schedule(dict):
        calls = 0

        def __getitem__(self, key):
            if key == "l2":
                Schedule.calls += 1
                return float(Schedule.calls)
            return super().__getitem__(key)

        def get(self, key, default=None):
            return self[key] if key in self else default

    w = torch.ones(3, dtype=torch.float64)
    reg = fastreg.Penalty([("w", w)], l2=1.0)
    reg.param_groups[0] = Schedule(reg.param_groups[0])
    values = [reg().item() for _ in range(3)]
    assert values[0] < values[1] < values[2]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_value_fast_path_follows_every_change(backend):
    """The value's calls are remembered for one cached coefficients list (Plan.one_node_calls):
    after each way of changing a coefficient, a param's dtype, or making a coefficient a tensor
    that needs a gradient, the value and its gradients are a fresh Penalty's."""
    if backend == "cpu" and fastreg._dispatch.unavailable_reason("cpu") is not None:
        pytest.skip("no cpu backend")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reg = fastreg.Penalty(model, backend=backend, l1=1e-2, l2=1e-2, group=1e-2)

    def check():
        fresh = fastreg.Penalty(model, backend=backend, **{k: reg.param_groups[0][k] for k in ("l1", "l2", "group")})
        assert torch.equal(reg(), fresh())
        for r in (reg, fresh):
            model.zero_grad(set_to_none=True)
            r().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            if r is reg:
                ours = grads
        assert all(torch.equal(a, b) for a, b in zip(ours, grads))

    check()
    first = reg._plan.coefficients()
    assert reg._plan.one_node_calls(first) is not None  # remembered
    reg.l2 = 3e-2
    check()
    reg.param_groups[0]["l1"] = 0.0
    check()
    reg.param_groups[0].update(group=0.0)
    check()
    assert reg._plan.one_node_calls(first) is None
    with torch.no_grad():
        model.weight.data = model.weight.data.double()
    check()
    model.weight.data = model.weight.data.float()
    l2 = torch.tensor(2e-2, requires_grad=True)
    reg.l2 = l2
    reg().backward()
    assert l2.grad is not None  # a coefficient that needs a gradient: the value formed per class
    assert reg._plan.one_node_calls(reg._plan.coefficients()) is None
