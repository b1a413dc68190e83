"""torch.compile: a training step with a fastreg penalty compiles with fullgraph=True, gives the
eager values and gradients, and does not recompile when 0-dim tensor coefficients change.

The step compiled is the forward, ``loss = task_loss + penalty``; ``loss.backward()`` runs
outside, on the compiled output (it runs the AOT-compiled backward). ``aot_eager`` exercises
dynamo, the ops' fake registrations and AOTAutograd quickly; one test uses inductor.
"""

import fnmatch

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastreg
import reference as ref

pytestmark = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")

# Tensors are made on torch's default device: the conftest ``backend`` fixture sets it to the
# backend's device (cuda for triton).


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given, then hands them to ``inner``."""

    def __init__(self, inner="aot_eager"):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.inner(gm, example_inputs)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.ReLU(), nn.Linear(20, 1))


def batch():
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randn(shape, generator=generator, device="cpu") for shape in ((8, 10), (8, 1)))
    return x.to(torch.get_default_device()), y.to(torch.get_default_device())


def loss_and_grads(step, model, *args):
    """Run ``loss = step(*args); loss.backward()`` from clean gradients."""
    model.zero_grad(set_to_none=True)
    loss = step(*args)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(compiled, eager, rtol=1e-6, atol=1e-7):
    (c_loss, c_grads), (e_loss, e_grads) = compiled, eager
    assert c_loss.dtype == e_loss.dtype == torch.float32 and c_loss.ndim == 0
    torch.testing.assert_close(c_loss, e_loss, rtol=rtol, atol=atol)
    assert c_grads.keys() == e_grads.keys()
    for name in e_grads:
        torch.testing.assert_close(c_grads[name], e_grads[name], rtol=rtol, atol=atol, msg=name)


def included(model, exclude):
    if exclude == "bias_and_norm":
        return [p for p in model.parameters() if p.ndim > 1]
    if callable(exclude):
        return [p for name, p in model.named_parameters() if not exclude(name, p)]
    if isinstance(exclude, list):
        return [p for name, p in model.named_parameters()
                if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]
    return list(model.parameters())


EXCLUDES = {
    "none": None,
    "bias_and_norm": "bias_and_norm",
    "callable": lambda name, p: name.startswith("1."),  # the LayerNorm
    "globs": ["*.bias", "1.*"],  # matched while tracing: fastreg's glob matcher is traceable
}


@pytest.mark.parametrize("exclude", list(EXCLUDES.values()), ids=list(EXCLUDES))
def test_penalty_called_inside_fullgraph(backend, exclude):
    model = small_model()
    x, y = batch()

    def step(x, y):
        return F.mse_loss(model(x), y) + fastreg.penalty(model, l1=1e-3, l2=1e-2, exclude=exclude, backend=backend)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_same_step(loss_and_grads(compiled, model, x, y), loss_and_grads(step, model, x, y))

    # The penalty alone, compiled, against the float64 reference.
    penalty_only = torch.compile(
        lambda: fastreg.penalty(model, l1=1e-3, l2=1e-2, exclude=exclude, backend=backend),
        backend="aot_eager", fullgraph=True)
    model.zero_grad(set_to_none=True)
    value = penalty_only()
    value.backward()
    params = included(model, exclude)
    torch.testing.assert_close(value.item(), ref.value(params, 1e-3, 1e-2), rtol=1e-6, atol=0)
    for p in model.parameters():
        if any(p is q for q in params):
            ref.assert_close_elementwise(p.grad, ref.grad(p, 1e-3, 1e-2), 1e-3 + 2e-2 * p.double().abs(), p.dtype)
        else:
            assert p.grad is None


def test_penalty_object_built_outside_fullgraph(backend):
    model = small_model()
    x, y = batch()
    reg = fastreg.Penalty(model, l1=1e-3, l2=torch.tensor(1e-2), exclude=["*.bias", "1.*"], backend=backend)
    assert [name for name, _ in reg.named_parameters()] == ["0.weight", "3.weight"]

    def step(x, y):
        return F.mse_loss(model(x), y) + reg()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_same_step(loss_and_grads(compiled, model, x, y), loss_and_grads(step, model, x, y))
    for name, p in model.named_parameters():
        if name not in ("0.weight", "3.weight"):
            continue
        # The penalty's share of the gradient, against the float64 reference.
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        task = p.grad.double()
        model.zero_grad(set_to_none=True)
        compiled(x, y).backward()
        ref.assert_close_elementwise(p.grad, task + ref.grad(p, 1e-3, 1e-2),
                                     task.abs() + 1e-3 + 2e-2 * p.double().abs(), p.dtype, ulps=4)


def test_tensor_coefficients_do_not_recompile(backend):
    model = small_model()
    x, y = batch()
    l1, l2 = torch.tensor(0.0), torch.tensor(0.0)
    reg = fastreg.Penalty(model, l1=l1, l2=l2, backend=backend)
    counter = CountingBackend()
    step = torch.compile(lambda x, y: F.mse_loss(model(x), y) + reg(), backend=counter, fullgraph=True)
    task = F.mse_loss(model(x), y).item()
    params = list(model.parameters())
    schedule = [(0.0, 1e-2), (1e-3, 2e-2), (2e-3, 5e-2), (0.0, 0.0)]
    for a, b in schedule:  # a schedule changing the tensors in place
        l1.fill_(a)
        l2.fill_(b)
        torch.testing.assert_close(step(x, y).item(), task + ref.value(params, a, b), rtol=1e-6, atol=1e-7)
    for a, b in schedule:  # or assigning new 0-dim tensors
        reg.l1, reg.l2 = torch.tensor(a), torch.tensor(b)
        torch.testing.assert_close(step(x, y).item(), task + ref.value(params, a, b), rtol=1e-6, atol=1e-7)
    assert counter.compiles == 1


def test_tensor_coefficients_as_arguments_do_not_recompile(backend):
    model = small_model()
    x, y = batch()
    counter = CountingBackend()

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, y, l1, l2):
        return F.mse_loss(model(x), y) + fastreg.penalty(model, l1=l1, l2=l2, backend=backend)

    params = list(model.parameters())
    for a, b in [(1e-3, 1e-2), (2e-3, 3e-2), (0.5, 0.25)]:
        l1, l2 = torch.tensor(a), torch.tensor(b)
        model.zero_grad(set_to_none=True)
        step(x, y, l1, l2).backward()
        compiled_grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        (F.mse_loss(model(x), y)).backward()
        for p, g, task in zip(params, compiled_grads, [p.grad.double() for p in params]):
            ref.assert_close_elementwise(g, task + ref.grad(p, a, b), task.abs() + a + 2 * b * p.double().abs(),
                                         p.dtype, ulps=4)
    assert counter.compiles == 1


def test_float_coefficients_recompile_when_they_change(backend):
    # PyTorch behaviour (pytorch issue 130467), documented: a Python float is specialized into
    # the graph, so a new value recompiles (dynamo may then make it a symbol). Use 0-dim
    # tensors for schedules. Still fullgraph, still correct.
    model = small_model()
    x, y = batch()
    reg = fastreg.Penalty(model, l2=1e-2, backend=backend)
    counter = CountingBackend()
    step = torch.compile(lambda x, y: F.mse_loss(model(x), y) + reg(), backend=counter, fullgraph=True)
    task = F.mse_loss(model(x), y).item()
    for b in (1e-2, 2e-2, 3e-2, 4e-2):
        reg.l2 = b
        torch.testing.assert_close(step(x, y).item(), task + ref.value(list(model.parameters()), 0, b),
                                   rtol=1e-6, atol=1e-7)
    assert counter.compiles > 1


def test_inductor_training_step():
    # The one inductor test (a cold inductor compile takes ~10 s on 2 CPU cores): two SGD steps
    # with a tensor-coefficient schedule, against the same steps run eagerly.
    def run(compile_step):
        model = small_model()
        x, y = batch()
        l2 = torch.tensor(1e-2)
        reg = fastreg.Penalty(model, l1=1e-3, l2=l2, exclude="bias_and_norm")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x, y):
            return F.mse_loss(model(x), y) + reg()

        counter = CountingBackend("inductor")
        if compile_step:
            step = torch.compile(step, backend=counter, fullgraph=True)
        losses = []
        for value in (1e-2, 3e-2):
            l2.fill_(value)
            optimizer.zero_grad(set_to_none=True)
            loss = step(x, y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses, [p.detach() for p in model.parameters()], counter.compiles

    c_losses, c_params, compiles = run(compile_step=True)
    e_losses, e_params, _ = run(compile_step=False)
    assert compiles == 1
    # Inductor fuses and reorders the task loss's arithmetic: rounding-level differences only.
    torch.testing.assert_close(c_losses, e_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_params, e_params, rtol=1e-5, atol=1e-6)
