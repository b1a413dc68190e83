"""A seeded fuzz of the eager autograd mode (``loss + reg()``) against plain autograd, step by step.

Two identical float64 models train side by side: one with ``loss + reg()`` (fastreg), the other
with the same penalty written in plain torch (``l1·Σ|d| + l2·Σd² + group·Σ_g ‖d_g‖₂``). Every
step draws, from the seed's own ``random.Random``, what a training loop may do around a backward:

* the optimizer (SGD with/without momentum, Adam, AdamW, RMSprop, Adagrad; foreach on/off);
* ``zero_grad(set_to_none=True / False)`` or no zeroing (accumulation across steps);
* the backward: plain, ``retain_graph=True`` then a second backward, ``create_graph=True`` (then,
  sometimes, ``autograd.grad`` of ``Σ‖p.grad‖²``, right away or after another backward has added
  into those ``p.grad``: plain torch raises there), ``torch.autograd.grad(loss, params)``
  (the user then adds the results to ``.grad``), ``backward(inputs=[subset])``, or 2-3
  micro-batches with the penalty divided by k or added once;
* hooks added and removed mid-training: ``p.register_hook``, ``p.register_post_accumulate_grad_hook``,
  a pre-hook and a hook on the parameter's AccumulateGrad node (held while registered); some
  rescale the gradient they see. What every hook sees is recorded on both copies and compared;
* gradients the user holds across steps: ``p.grad`` itself, ``p.grad[0]``, ``p.grad.detach()``,
  ``p.grad.numpy()``, ``p.grad.untyped_storage()``, a DLPack capsule. After every backward what
  each holds must equal what plain torch's copy holds (so it is unchanged wherever torch leaves it
  unchanged, e.g. after ``zero_grad(set_to_none=True)``);
* ``.data`` swaps: new values of the same shape (contiguous or in another memory layout); a
  Linear grown by two output units (``weight.data`` and ``bias.data`` replaced; it has no
  center); that Linear cast float64 -> float32 on both copies.

After every backward the penalty values, every ``.grad`` (and whether it requires grad), any
``autograd.grad`` results and every hook record are compared; after every optimizer step, every
parameter, after which the fastreg copy gets the reference's weights again (through ``.data``),
so that each step is compared from identical weights. float64 throughout: rtol 1e-10 (atol
1e-12); once a float32 parameter exists, the float32 tolerance (rtol 1e-4, atol 1e-5). A
parameter whose shape or dtype changed under a ``Penalty`` may instead make fastreg raise a
``ValueError`` / ``RuntimeError`` / ``TypeError`` naming it (the fuzz then builds the Penalty
again, as a user would, and goes on), never give a wrong number.

In odd seeds the penalty has per-parameter settings: two rules by name (``fc1.*``, ``conv.*``)
with their own l1, l2, group and group_dim over the defaults (param groups in one Penalty).

The model has tied weights, frozen parameters, a conv, centers on some parameters and a
parameter of 65,792 elements alone in its kernel group in some seeds (large enough for the
eager backward's gradient-memory reuse on a CPU). Deterministic targeted tests follow the fuzz:
each pins one observable behaviour plain torch has (held storages, AccumulateGrad pre-hooks,
shape changes, version counters after ``create_graph=True``).

``run_fuzz(seed, backend, mixed, candidate=...)`` takes the side under test as an argument so
that the harness can be checked against itself (plain torch on both sides).
"""

import copy
import fnmatch
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import dlpack

import fastreg

RTOL64, ATOL64 = 1e-10, 1e-12
RTOL32, ATOL32 = 1e-4, 1e-5
STEPS = 20
SEEDS = range(8)
HIDDEN = 8
BIG = (257, 256)  # 65,792 elements: alone in a kernel group, above the CPU gradient-reuse threshold
BIG_SEEDS = (0, 3)  # seeds whose "big" is BIG and alone under a center (seed % 3 == 0)
ACCEPTED_ERRORS = (ValueError, RuntimeError, TypeError)

pytestmark = [pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
              pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")]


# ----------------------------------------------------------------------------------------------
# The model


class CastLinear(nn.Linear):
    """A Linear whose parameters may have another dtype than its input (cast in and out)."""

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class Net(nn.Module):
    def __init__(self, big=BIG):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(48, HIDDEN)
        self.big = nn.Parameter(torch.randn(big) * 0.05)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2b = nn.Linear(HIDDEN, HIDDEN)
        self.fc2b.weight = self.fc2.weight  # tied
        self.frozen = nn.Linear(HIDDEN, HIDDEN)
        self.frozen.requires_grad_(False)
        self.fc1.bias.requires_grad_(False)  # a frozen parameter inside a trained module
        self.head = nn.Linear(HIDDEN, 3)
        self.grow = CastLinear(HIDDEN, 4)  # no center: its output units grow

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc1(h))
        h = h + torch.tanh(h @ self.big[:HIDDEN, :HIDDEN])
        h = torch.tanh(self.fc2b(torch.tanh(self.fc2(h))))
        h = self.frozen(h)
        return self.head(h), self.grow(h)


def loss_of(model, x, y):
    out, aux = model(x)
    return F.mse_loss(out, y) + 0.1 * aux.pow(2).mean()


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# The two sides


class Side:
    """One copy of the model with its optimizer, hooks, hook records and held gradients."""

    def __init__(self, model, cfg, backend):
        self.model, self.cfg, self.backend = model, cfg, backend
        self.optimizer = None
        self.hooks = {}  # id -> (handle, node or None, name, kind)
        self.records = {}  # id -> [tensor seen at each call]
        self.holds = {}  # id -> Held

    def params(self):
        return dict(trainable(self.model))

    def penalty(self):
        raise NotImplementedError

    def penalty_changed(self, names):
        """Parameters named here changed shape or dtype (``.data`` swapped)."""

    def set_optimizer(self, spec):
        self.optimizer = make_optimizer(spec, [p for _, p in trainable(self.model)])

    # Hooks -------------------------------------------------------------------------------------

    def add_hook(self, hook_id, kind, name, scale):
        p = self.params()[name]
        seen = self.records.setdefault(hook_id, [])
        node = None
        if kind == "tensor":
            def hook(grad):
                seen.append(grad.detach().clone())
                return None if scale == 1.0 else grad * scale
            handle = p.register_hook(hook)
        elif kind == "post_accumulate":
            handle = p.register_post_accumulate_grad_hook(lambda q: seen.append(q.grad.detach().clone()))
        elif kind == "node_pre":
            node = torch.autograd.graph.get_gradient_edge(p).node

            def prehook(grad_outputs):
                seen.append(grad_outputs[0].detach().clone())
                return None if scale == 1.0 else (grad_outputs[0] * scale,)
            handle = node.register_prehook(prehook)
        else:  # "node_post"
            node = torch.autograd.graph.get_gradient_edge(p).node
            handle = node.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_outputs[0].detach().clone()))
        self.hooks[hook_id] = (handle, node, name, kind)

    def remove_hook(self, hook_id):
        handle, _, _, _ = self.hooks.pop(hook_id)  # (and the AccumulateGrad node held for it)
        handle.remove()

    # Held gradients ----------------------------------------------------------------------------

    def grab(self, hold_id, kind, name):
        grad = self.params()[name].grad
        self.holds[hold_id] = Held(kind, grad)

    def release(self, hold_id):
        del self.holds[hold_id]

    # One step's backward -----------------------------------------------------------------------

    def run(self, draw, x, y):
        """Zero (or not) and run the drawn backward; returns what is compared besides ``.grad``."""
        out = {"values": []}
        if draw["zero"] is not None:
            self.optimizer.zero_grad(set_to_none=draw["zero"])
        mode = draw["mode"]
        if mode == "accumulate":
            k, once = draw["k"], draw["once"]
            for i, (xb, yb) in enumerate(zip(x.chunk(k), y.chunk(k))):
                loss = loss_of(self.model, xb, yb) / k
                out["values"].append(loss.detach())
                if once is None or i == once:
                    pen = self.penalty()
                    out["values"].append(pen.detach())
                    loss = loss + (pen / k if once is None else pen)
                loss.backward()
            return out
        loss = loss_of(self.model, x, y)
        pen = self.penalty()
        out["values"] += [loss.detach(), pen.detach()]
        total = loss + pen
        params = self.params()
        if mode == "backward":
            total.backward()
        elif mode == "retain_twice":
            total.backward(retain_graph=True)
            total.backward()
        elif mode == "create_graph":
            total.backward(create_graph=True)
            if draw["hvp"] is not None:
                # A gradient penalty Σ‖p.grad‖²: differentiated now, or after another backward
                # that adds into the very p.grad it saved (plain torch then raises: the
                # in-place accumulation bumped their version counters).
                names = [n for n, p in params.items() if p.grad is not None and p.grad.requires_grad]
                gp = sum(params[n].grad.pow(2).sum() for n in names)
                if draw["hvp"] != "now":
                    again = self.penalty()
                    if draw["hvp"] == "after (loss + penalty).backward()":
                        again = loss_of(self.model, x.flip(0), y.flip(0)) + again
                    out["values"].append(again.detach())
                    again.backward()
                try:
                    hvp = torch.autograd.grad(gp, [params[n] for n in names], allow_unused=True)
                    out["hvp"] = {n: None if h is None else h.detach().clone() for n, h in zip(names, hvp)}
                except RuntimeError as error:
                    if "modified by an inplace operation" not in str(error):
                        raise
                    out["hvp"] = "RuntimeError: modified by an inplace operation"
        elif mode == "autograd_grad":
            names = list(params)
            grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
            out["grads"] = {n: None if g is None else g.detach().clone() for n, g in zip(names, grads)}
            for n, g in zip(names, grads):
                if g is not None:
                    p = params[n]
                    p.grad = g if p.grad is None else p.grad + g
        elif mode == "inputs_subset":
            total.backward(inputs=[params[n] for n in draw["subset"]])
        else:
            raise AssertionError(mode)
        return out


class ReferenceSide(Side):
    """The penalty written in plain torch, term by term, in each parameter's own dtype."""

    def settings(self, name):
        """The settings of one parameter: the first rule matching its name, over the defaults."""
        chosen = {key: self.cfg[key] for key in ("l1", "l2", "group", "group_dim")}
        for pattern, settings in self.cfg["rules"] or ():
            if fnmatch.fnmatchcase(name, pattern):
                return {**chosen, **settings}
        return chosen

    def penalty(self):
        total = None
        for name, p in trainable(self.model):
            l1, l2, group, group_dim = (self.settings(name)[k] for k in ("l1", "l2", "group", "group_dim"))
            d = p - self.cfg["centers"][name] if name in self.cfg["centers"] else p
            term = l1 * d.abs().sum() + l2 * d.pow(2).sum()
            if group and p.ndim >= 2:
                rows = d.movedim(group_dim, 0).reshape(d.shape[group_dim], -1)
                term = term + group * torch.linalg.vector_norm(rows, dim=1).sum()
            term = term.double()
            total = term if total is None else total + term
        return total


class FastregSide(Side):
    """``loss + reg()`` with a ``fastreg.Penalty`` over the module."""

    def __init__(self, model, cfg, backend):
        super().__init__(model, cfg, backend)
        self.stale = set()  # parameters whose shape or dtype changed since the Penalty was built
        self.rebuilds = []  # the errors that made the fuzz build the Penalty again
        self.build()

    def build(self):
        cfg = self.cfg
        self.reg = fastreg.Penalty(self.model, l1=cfg["l1"], l2=cfg["l2"], group=cfg["group"],
                                   group_dim=cfg["group_dim"], center=cfg["centers"] or None, rules=cfg["rules"],
                                   backend=self.backend)
        self.stale = set()

    def penalty(self):
        return self.reg()

    def penalty_changed(self, names):
        self.stale |= set(names)

    def run(self, draw, x, y):
        if not self.stale:
            return super().run(draw, x, y)
        # A shape or dtype changed under the Penalty: a clear error naming the parameter is an
        # accepted answer. Then, as a user would, build the Penalty again and redo the step.
        before = self.snapshot()
        try:
            return super().run(draw, x, y)
        except ACCEPTED_ERRORS as error:
            if not any(name in str(error) for name in self.stale):
                raise
            self.rebuilds.append(f"{type(error).__name__}: {error}")
            self.restore(before)
            self.build()
            return super().run(draw, x, y)

    def snapshot(self):
        grads = {n: (p.grad, None if p.grad is None else p.grad.detach().clone()) for n, p in self.params().items()}
        return grads, {i: len(r) for i, r in self.records.items()}

    def restore(self, before):
        grads, lengths = before
        params = self.params()
        with torch.no_grad():
            for n, (g, values) in grads.items():
                if g is not None:
                    g.copy_(values)
                params[n].grad = g
        for i, n in lengths.items():
            del self.records[i][n:]


class Held:
    """A gradient, or something sharing its memory, that the user keeps across steps."""

    KINDS = ("tensor", "view", "detach", "numpy", "storage", "dlpack")

    def __init__(self, kind, grad):
        self.kind = kind
        plain = grad.detach() if grad.requires_grad else grad
        if kind == "tensor":
            self.obj = grad
        elif kind == "view":
            self.obj = grad[0]
        elif kind == "detach":
            self.obj = grad.detach()
        elif kind == "numpy":
            self.obj = plain.numpy()
        elif kind == "storage":
            self.obj = grad.untyped_storage()
            self.geometry = (grad.storage_offset(), tuple(grad.shape), grad.stride(), grad.dtype, grad.device)
        elif kind == "dlpack":
            self.obj = dlpack.to_dlpack(plain)
        else:
            raise AssertionError(kind)
        self.at_grab = self.read()

    def read(self):
        """A copy of what it holds now."""
        if self.kind in ("tensor", "view", "detach"):
            return self.obj.detach().clone()
        if self.kind == "numpy":
            return torch.from_numpy(self.obj.copy())
        if self.kind == "storage":
            offset, shape, stride, dtype, device = self.geometry
            return torch.empty(0, dtype=dtype, device=device).set_(self.obj, offset, shape, stride).clone()
        tensor = dlpack.from_dlpack(self.obj)  # a capsule is consumed once: hold a new one
        value = tensor.clone()
        self.obj = dlpack.to_dlpack(tensor)
        return value


def make_optimizer(spec, params):
    # eps 1e-6, not the defaults (1e-8, Adagrad 1e-10): an update g / (|g| + eps) turns a
    # rounding-level difference in a gradient near 0 into lr / eps times as much in the weight.
    kind, foreach, momentum = spec
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=momentum, foreach=foreach)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, eps=1e-6, foreach=foreach)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, eps=1e-6, weight_decay=1e-2, foreach=foreach)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3, eps=1e-6, foreach=foreach)
    return torch.optim.Adagrad(params, lr=5e-2, eps=1e-6, foreach=foreach)


# ----------------------------------------------------------------------------------------------
# The driver


class Fuzz:
    def __init__(self, seed, backend, mixed, candidate):
        self.seed, self.rng = seed, random.Random(seed)
        self.device = torch.get_default_device()
        torch.manual_seed(seed)
        # "big" alone under a center (seed % 3 == 0) is a kernel group of 65,792 elements in two
        # seeds; elsewhere it is small (a large tensor slows every step down).
        model = Net(BIG if seed in BIG_SEEDS else (HIDDEN + 1, HIDDEN)).double()
        if mixed:
            model.grow.float()
        cfg = self.draw_config(model)
        self.ref = ReferenceSide(model, cfg, backend)
        self.cand = candidate(copy.deepcopy(model), cfg, backend)
        self.sides = (self.ref, self.cand)
        self.next_id = 0
        self.hold_release = {}  # hold id -> step at which it is released
        self.log = []
        self.step = 0
        self.grown = 0
        self.loose = False
        self.update_tolerance()

    def draw_config(self, model):
        rng = self.rng
        l1, l2, group = rng.choice([0.0, 1e-3, 1e-2]), rng.choice([0.0, 1e-2, 5e-2]), rng.choice([0.0, 1e-2, 3e-2])
        if not (l1 or l2 or group):
            l2 = 1e-2
        names = [("big",), ("big", "conv.weight", "fc1.weight"), ()][self.seed % 3]
        generator = torch.Generator().manual_seed(self.seed + 100)
        params = dict(model.named_parameters())
        centers = {n: (params[n].detach().cpu() + 0.01 * torch.randn(params[n].shape, generator=generator,
                                                                        dtype=params[n].dtype)).to(self.device)
                   for n in names}
        rules = None
        if self.seed % 2:  # per-parameter settings: two rules by name over the defaults (own generator,
            # so the rest of the seed's draws are unchanged)
            own = random.Random(self.seed + 200)
            rules = [(pattern, {"l1": own.choice([0.0, 2e-3]), "l2": own.choice([0.0, 3e-2]),
                                "group": own.choice([0.0, 2e-2]), "group_dim": own.choice([0, 1])})
                     for pattern in ("fc1.*", "conv.*")]
        return {"l1": l1, "l2": l2, "group": group, "group_dim": rng.choice([0, 1]), "centers": centers,
                "rules": rules}

    # Comparisons ------------------------------------------------------------------------------

    def update_tolerance(self):
        """float32 tolerances once a float32 parameter exists (its rounding reaches every weight)."""
        self.loose = self.loose or any(p.dtype != torch.float64 for p in self.ref.model.parameters())

    def context(self):
        history = "\n  ".join(self.log[-8:])
        rebuilt = getattr(self.cand, "rebuilds", [])
        return (f"seed {self.seed}, step {self.step}\n  recent actions:\n  {history}"
                + (f"\n  Penalty rebuilt after: {rebuilt}" if rebuilt else ""))

    def fail(self, what):
        raise AssertionError(f"{what}\n{self.context()}")

    def check_close(self, actual, expected, what):
        if actual is None or expected is None:
            if actual is not expected:
                self.fail(f"{what}: fastreg {_describe(actual)}, torch {_describe(expected)}")
            return
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            self.fail(f"{what}: fastreg {_describe(actual)}, torch {_describe(expected)}")
        rtol, atol = (RTOL32, ATOL32) if self.loose else (RTOL64, ATOL64)
        a, e = actual.detach().double(), expected.detach().double()
        if not torch.allclose(a, e, rtol=rtol, atol=atol):
            worst = (a - e).abs().max().item()
            self.fail(f"{what} differs: max |fastreg - torch| = {worst:.3e} (|torch| max {e.abs().max().item():.3e})")

    def compare_outputs(self, ref_out, cand_out):
        if len(ref_out["values"]) != len(cand_out["values"]):
            self.fail("not the same number of loss / penalty values")
        for i, (a, e) in enumerate(zip(cand_out["values"], ref_out["values"])):
            self.check_close(a, e, f"loss or penalty value #{i}")
        if ref_out.keys() != cand_out.keys():
            self.fail(f"fastreg gave {sorted(cand_out)}, torch {sorted(ref_out)}")
        if isinstance(ref_out.get("hvp"), str) or isinstance(cand_out.get("hvp"), str):
            if ref_out["hvp"] != cand_out["hvp"]:
                self.fail(f"gradient penalty after another backward: fastreg {_summary(cand_out['hvp'])}, "
                          f"torch {_summary(ref_out['hvp'])}")
            ref_out, cand_out = dict(ref_out), dict(cand_out)
            del ref_out["hvp"], cand_out["hvp"]
        for key in ("grads", "hvp"):
            if key in ref_out:
                if ref_out[key].keys() != cand_out[key].keys():
                    self.fail(f"{key}: different parameters")
                for name, e in ref_out[key].items():
                    self.check_close(cand_out[key][name], e, f"{key}[{name}]")

    def compare_grads(self):
        ref, cand = self.ref.params(), self.cand.params()
        for name, p in ref.items():
            q = cand[name]
            self.check_close(q.grad, p.grad, f"{name}.grad")
            if p.grad is not None and p.grad.requires_grad != q.grad.requires_grad:
                self.fail(f"{name}.grad.requires_grad: fastreg {q.grad.requires_grad}, torch {p.grad.requires_grad}")

    def compare_params(self):
        ref, cand = self.ref.params(), self.cand.params()
        for name, p in ref.items():
            self.check_close(cand[name], p, f"parameter {name}")

    def compare_records(self):
        for hook_id, seen in self.ref.records.items():
            other = self.cand.records.get(hook_id, [])
            kind = self.ref.hooks[hook_id][3] if hook_id in self.ref.hooks else "removed"
            if len(other) != len(seen):
                self.fail(f"hook #{hook_id} ({kind}) ran {len(other)} times with fastreg, {len(seen)} with torch")
            for i, (a, e) in enumerate(zip(other, seen)):
                self.check_close(a, e, f"what hook #{hook_id} ({kind}) saw at its call {i}")

    def compare_holds(self):
        for hold_id, held in self.ref.holds.items():
            mine = self.cand.holds[hold_id]
            now, mine_now = held.read(), mine.read()
            if torch.equal(now, held.at_grab) and not torch.equal(mine_now, mine.at_grab):
                self.fail(f"fastreg changed the memory of a gradient the user holds ({held.kind}, hold "
                          f"#{hold_id}); plain torch left it unchanged")
            self.check_close(mine_now, now, f"held gradient #{hold_id} ({held.kind})")

    # Actions ----------------------------------------------------------------------------------

    def both(self, method, *args):
        for side in self.sides:
            getattr(side, method)(*args)

    def new_id(self):
        self.next_id += 1
        return self.next_id

    def set_optimizer(self):
        rng = self.rng
        spec = (rng.choice(["sgd", "adam", "adamw", "rmsprop", "adagrad"]), rng.choice([True, False]),
                rng.choice([0.0, 0.9]))
        self.optimizer_spec = spec
        self.log.append(f"step {self.step}: optimizer {spec}")
        self.both("set_optimizer", spec)

    def hooks(self):
        rng = self.rng
        names = list(self.ref.params())
        if self.ref.hooks and rng.random() < 0.3:
            hook_id = rng.choice(sorted(self.ref.hooks))
            self.log.append(f"step {self.step}: remove hook #{hook_id}")
            self.both("remove_hook", hook_id)
        if rng.random() < 0.4:
            kind = rng.choice(["tensor", "post_accumulate", "node_pre", "node_post"])
            scale = rng.choice([1.0, 0.5]) if kind in ("tensor", "node_pre") else 1.0
            name, hook_id = rng.choice(names), self.new_id()
            self.log.append(f"step {self.step}: add hook #{hook_id} {kind} on {name} (scale {scale})")
            self.both("add_hook", hook_id, kind, name, scale)

    def holds(self):
        rng = self.rng
        for hold_id, release in list(self.hold_release.items()):
            if release <= self.step:
                self.both("release", hold_id)
                del self.hold_release[hold_id]
        if rng.random() < 0.6:
            params = self.ref.params()
            names = [n for n, p in params.items() if p.grad is not None]
            if not names:
                return
            name = "big" if "big" in names and rng.random() < 0.4 else rng.choice(names)
            kinds = [k for k in Held.KINDS if k != "numpy" or self.device.type == "cpu"]
            kind, hold_id = rng.choice(kinds), self.new_id()
            self.hold_release[hold_id] = self.step + rng.randint(1, 3)
            self.log.append(f"step {self.step}: hold #{hold_id} {kind} of {name}.grad")
            self.both("grab", hold_id, kind, name)

    def release_for_swap(self, names):
        """Before a shape or dtype change: no held gradient (a create_graph gradient keeps the old
        AccumulateGrad node alive in plain torch too) and no hook on the old AccumulateGrad nodes."""
        for hold_id in list(self.hold_release):
            self.both("release", hold_id)
            del self.hold_release[hold_id]
        for hook_id, (_, node, name, _) in list(self.ref.hooks.items()):
            if node is not None and name in names:
                self.both("remove_hook", hook_id)

    def swap(self):
        rng = self.rng
        kind = rng.choice(["values", "values", "grow", "float32"])
        if kind == "grow" and self.grown >= 2:
            kind = "values"
        if kind == "float32" and self.ref.model.grow.weight.dtype == torch.float32:
            kind = "values"
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.step + 7)
        if kind == "values":
            name = rng.choice(list(self.ref.params()))
            layout = rng.choice(["contiguous", "transposed"])
            p = self.ref.params()[name]
            noise = 0.01 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
            self.log.append(f"step {self.step}: {name}.data = new values ({layout})")
            for side in self.sides:
                q = side.params()[name]
                new = (q.detach() * 0.9 + noise.to(q.device)).contiguous()
                if layout == "transposed" and new.ndim >= 2:
                    new = new.transpose(0, 1).contiguous().transpose(0, 1)
                q.data = new
            return
        names = ["grow.weight", "grow.bias"]
        self.release_for_swap(names)
        for side in self.sides:
            side.optimizer.zero_grad(set_to_none=True)
        if kind == "grow":
            self.grown += 1
            w = self.ref.model.grow.weight
            new_w = 0.3 * torch.randn((2, w.shape[1]), generator=generator, dtype=torch.float64)
            new_b = 0.3 * torch.randn(2, generator=generator, dtype=torch.float64)
            self.log.append(f"step {self.step}: grow.weight/bias.data grown to {w.shape[0] + 2} output units")
            for side in self.sides:
                layer = side.model.grow
                with torch.no_grad():
                    layer.weight.data = torch.cat([layer.weight.detach(), new_w.to(layer.weight)])
                    layer.bias.data = torch.cat([layer.bias.detach(), new_b.to(layer.bias)])
                layer.out_features += 2
        else:
            self.log.append(f"step {self.step}: grow.weight/bias.data cast to float32")
            for side in self.sides:
                layer = side.model.grow
                layer.weight.data = layer.weight.detach().float()
                layer.bias.data = layer.bias.detach().float()
        for side in self.sides:
            side.penalty_changed(names)
            side.set_optimizer(self.optimizer_spec)  # fresh state for the new shapes / dtypes

    def draw_step(self):
        rng = self.rng
        zero = rng.choices([None, True, False], weights=[0.15, 0.45, 0.4])[0]
        mode = rng.choices(["backward", "retain_twice", "create_graph", "autograd_grad", "inputs_subset",
                            "accumulate"], weights=[3, 1, 1, 1, 1, 2])[0]
        draw = {"zero": zero, "mode": mode}
        if mode == "accumulate":
            draw["k"] = rng.choice([2, 3])
            draw["once"] = rng.choice([None, 0, draw["k"] - 1])
        elif mode == "create_graph":
            draw["hvp"] = rng.choice([None, "now", "after penalty.backward()", "after (loss + penalty).backward()"])
        elif mode == "inputs_subset":
            names = list(self.ref.params())
            draw["subset"] = sorted(rng.sample(names, rng.randint(1, len(names) - 1)), key=names.index)
        draw["optimizer_step"] = rng.random() < 0.85
        return draw

    def data(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.step)
        x = torch.randn((6, 2, 4, 4), generator=generator, dtype=torch.float64).to(self.device)
        y = torch.randn((6, 3), generator=generator, dtype=torch.float64).to(self.device)
        return x, y

    def run(self):
        try:
            self.steps()
        except Exception as error:
            if not isinstance(error, AssertionError):
                error.add_note(f"in the fuzz at {self.context()}")
            raise

    def steps(self):
        self.set_optimizer()
        for self.step in range(STEPS):
            if self.step and self.rng.random() < 0.2:
                self.set_optimizer()
            if self.step and self.rng.random() < 0.2:
                self.swap()
                self.update_tolerance()
            self.hooks()
            draw = self.draw_step()
            self.log.append(f"step {self.step}: {draw}")
            x, y = self.data()
            ref_out = self.ref.run(draw, x, y)
            cand_out = self.cand.run(draw, x, y)
            self.compare_outputs(ref_out, cand_out)
            self.compare_grads()
            self.compare_records()
            self.compare_holds()
            self.holds()
            if draw["optimizer_step"]:
                for side in self.sides:
                    side.optimizer.step()
                self.compare_params()
                self.resync()

    def resync(self):
        """Give the candidate the reference's weights again (through ``.data``: no version bump,
        same tensors). Each step then starts from identical weights: over many steps, adaptive
        optimizers amplify rounding-level differences (an update ``g / (sqrt(v) + eps)`` of a
        gradient near 0) far beyond any fixed tolerance."""
        ref, cand = self.ref.params(), self.cand.params()
        with torch.no_grad():
            for name, p in ref.items():
                cand[name].data.copy_(p.data)


def _summary(hvp):
    return hvp if isinstance(hvp, str) else "Hessian-vector products (no error)"


def _describe(t):
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


def run_fuzz(seed, backend, mixed=False, candidate=FastregSide):
    fuzz = Fuzz(seed, backend, mixed, candidate)
    fuzz.run()
    return fuzz


# ----------------------------------------------------------------------------------------------
# The fuzz


@pytest.mark.parametrize("seed", SEEDS)
def test_eager_backward_matches_plain_autograd(backend, seed):
    run_fuzz(seed, backend)


@pytest.mark.parametrize("seed", [10, 11])
def test_eager_backward_matches_plain_autograd_with_mixed_dtypes(backend, seed):
    # grow (a Linear) is float32 from the start: two kernel groups of different dtypes.
    run_fuzz(seed, backend, mixed=True)


# ----------------------------------------------------------------------------------------------
# Targeted cases: each is one observable behaviour of plain torch the eager backward must keep.


def _pair(shape, backend, l1=1e-2, l2=5e-2, group=3e-2):
    """A float64 parameter under a Penalty, and its plain-torch twin with the same penalty."""
    w = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    v = nn.Parameter(w.detach().clone())
    reg = fastreg.Penalty([("w", w)], l1=l1, l2=l2, group=group, backend=backend)

    def plain():
        return l1 * v.abs().sum() + l2 * v.pow(2).sum() + group * torch.linalg.vector_norm(v, dim=1).sum()
    return w, reg, v, plain


@pytest.mark.parametrize("first", ["loss", "loss+penalty"])
def test_create_graph_gradient_modified_in_place_raises_like_torch(backend, first):
    x = torch.randn(7, 5, dtype=torch.float64)
    w, reg, v, plain = _pair((5, 4), backend)
    # Plain torch: the second backward adds into w.grad in place, which gp saved.
    loss = (x @ v).pow(2).sum()
    (loss + plain() if first == "loss+penalty" else loss).backward(create_graph=True)
    gp = (v.grad ** 2).sum()
    plain().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gp.backward()
    # fastreg must not modify it behind autograd's back.
    loss = (x @ w).pow(2).sum()
    (loss + reg() if first == "loss+penalty" else loss).backward(create_graph=True)
    gp = (w.grad ** 2).sum()
    reg().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        gp.backward()


@pytest.mark.parametrize("shape", [(6, 5), BIG], ids=["small", "big"])
@pytest.mark.parametrize("kind", Held.KINDS)
@pytest.mark.parametrize("how", ["grad=None", "zero_grad"])
def test_held_gradient_keeps_its_values_after_grad_is_set_to_none(backend, shape, kind, how):
    if kind == "numpy" and torch.get_default_device().type != "cpu":
        pytest.skip("numpy holds CPU memory only")
    w, reg, v, plain = _pair(shape, backend)
    optimizer = torch.optim.SGD([w], lr=0.1)
    for _ in range(2):  # the second step: gradients created by the penalty's own backward
        optimizer.zero_grad(set_to_none=True)
        reg().backward()
        optimizer.step()
    held = Held(kind, w.grad)
    if how == "grad=None":
        w.grad = None
    else:
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        w.mul_(0.5)
        v.copy_(w)
    reg().backward()
    plain().backward()
    assert torch.equal(held.read(), held.at_grab), f"the held {kind} changed when a new gradient was computed"
    torch.testing.assert_close(w.grad, v.grad, rtol=RTOL64, atol=ATOL64)


def test_held_untyped_storage_keeps_the_old_gradient(backend):
    # The exact sequence: a gradient's storage held, w.grad = None, the next backward.
    w = nn.Parameter(torch.randn(BIG, dtype=torch.float64))
    reg = fastreg.Penalty([w], l2=0.5, backend=backend)
    reg().backward()
    reg().backward()  # grows w.grad in place: 2 * (2·0.5·w)
    w.grad = None
    reg().backward()
    storage = w.grad.untyped_storage()
    kept = w.grad.detach().clone()
    w.grad = None
    with torch.no_grad():
        w.add_(1.0)
    reg().backward()
    now = torch.empty(0, dtype=w.dtype, device=w.device).set_(storage, 0, w.shape, w.stride())
    assert torch.equal(now, kept), "the held storage of the previous gradient was overwritten"
    torch.testing.assert_close(w.grad, w.detach(), rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("change", [None, 0.5], ids=["observe", "rescale"])
def test_accumulate_grad_pre_hook_sees_the_whole_gradient(backend, change):
    x = torch.randn(7, 5, dtype=torch.float64)
    results = []
    for use_fastreg in (True, False):
        torch.manual_seed(3)
        w, reg, v, plain = _pair((5, 4), backend)
        p, penalty = (w, reg) if use_fastreg else (v, plain)
        seen = []
        node = torch.autograd.graph.get_gradient_edge(p).node

        def prehook(grad_outputs, seen=seen):
            seen.append(grad_outputs[0].detach().clone())
            return None if change is None else (grad_outputs[0] * change,)
        handle = node.register_prehook(prehook)
        for _ in range(2):
            p.grad = None
            ((x @ p).pow(2).sum() + penalty()).backward()
        handle.remove()
        results.append((seen, p.grad.detach().clone()))
    (seen, grad), (seen_ref, grad_ref) = results
    assert len(seen) == len(seen_ref) == 2
    for a, e in zip(seen, seen_ref):
        torch.testing.assert_close(a, e, rtol=RTOL64, atol=ATOL64)
    torch.testing.assert_close(grad, grad_ref, rtol=RTOL64, atol=ATOL64)


@pytest.mark.parametrize("mode", ["backward", "autograd_grad"])
def test_parameter_whose_data_changes_shape(backend, mode):
    # A Linear grown by replacing weight.data and bias.data: fastreg follows the new shapes or
    # raises an error naming the parameter; never a gradient of the old shape or a wrong value.
    torch.manual_seed(4)
    layer = nn.Linear(5, 3).double()
    twin = copy.deepcopy(layer)
    reg = fastreg.Penalty(layer, l1=1e-2, l2=5e-2, group=3e-2, backend=backend)
    x = torch.randn(7, 5, dtype=torch.float64)

    def plain(m):
        w, b = m.weight, m.bias
        return (1e-2 * (w.abs().sum() + b.abs().sum()) + 5e-2 * (w.pow(2).sum() + b.pow(2).sum())
                + 3e-2 * torch.linalg.vector_norm(w, dim=1).sum())

    def grads(m, penalty):
        total = m(x).pow(2).mean() + penalty()
        if mode == "backward":
            m.zero_grad(set_to_none=True)
            total.backward()
            return [m.weight.grad, m.bias.grad]
        return list(torch.autograd.grad(total, [m.weight, m.bias]))

    grads(layer, reg)  # a first step with the old shape
    extra_w, extra_b = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    for m in (layer, twin):
        m.zero_grad(set_to_none=True)
        m.weight.data = torch.cat([m.weight.detach(), extra_w])
        m.bias.data = torch.cat([m.bias.detach(), extra_b])
        m.out_features = 5
    expected = grads(twin, lambda: plain(twin))
    try:
        actual = grads(layer, reg)
    except ACCEPTED_ERRORS as error:
        assert "'weight'" in str(error) or "'bias'" in str(error), f"the error does not name the parameter: {error}"
        return
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL64, atol=ATOL64)
