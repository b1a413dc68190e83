"""The benchmark cases: parameter shape lists, the parameters built from them, and their float64 reference.

Every shape list is written out here (no torchvision / transformers import) and checked against the
published tensor count and parameter total when this module is imported.
"""

import math
from dataclasses import dataclass

import torch

# N(0, INIT_STD): the GPT-2 / BERT initializer; every case uses it.
INIT_STD = 0.02


@dataclass(frozen=True)
class Case:
    name: str  # what --cases takes
    title: str  # what the tables show
    shapes: tuple  # ((parameter name, shape), ...)
    in_quick: bool  # run by --quick unless --cases says otherwise

    @property
    def num_tensors(self):
        return len(self.shapes)

    @property
    def num_elements(self):
        return sum(math.prod(shape) for _, shape in self.shapes)


def _seed_mlp_shapes():
    """The seed article's ``SimpleNet``: Linear(10, 20) -> ReLU -> Linear(20, 1)."""
    return (
        ("fc1.weight", (20, 10)),
        ("fc1.bias", (20,)),
        ("fc2.weight", (1, 20)),
        ("fc2.bias", (1,)),
    )


def _many_small_shapes(count=2000, size=1000):
    return tuple((f"p{i}", (size,)) for i in range(count))


# ResNet-50 (torchvision ``resnet50()``): (blocks, bottleneck width) of layer1..layer4.
RESNET50_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
BOTTLENECK_EXPANSION = 4


def _resnet50_shapes():
    """``torchvision.models.resnet50().named_parameters()`` shapes, in its order."""

    def batch_norm(prefix, channels):
        return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]

    shapes = [("conv1.weight", (64, 3, 7, 7)), *batch_norm("bn1", 64)]
    in_channels = 64
    for stage, (blocks, width) in enumerate(RESNET50_STAGES, start=1):
        out_channels = width * BOTTLENECK_EXPANSION
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes += [
                (f"{prefix}.conv1.weight", (width, in_channels, 1, 1)), *batch_norm(f"{prefix}.bn1", width),
                (f"{prefix}.conv2.weight", (width, width, 3, 3)), *batch_norm(f"{prefix}.bn2", width),
                (f"{prefix}.conv3.weight", (out_channels, width, 1, 1)), *batch_norm(f"{prefix}.bn3", out_channels),
            ]
            if block == 0:  # the projection shortcut
                shapes += [(f"{prefix}.downsample.0.weight", (out_channels, in_channels, 1, 1)),
                           *batch_norm(f"{prefix}.downsample.1", out_channels)]
            in_channels = out_channels
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return tuple(shapes)


# GPT-2 small (Hugging Face ``GPT2Model``; Conv1D weights are stored (in, out)).
GPT2_VOCAB, GPT2_CONTEXT, GPT2_WIDTH, GPT2_LAYERS = 50257, 1024, 768, 12


def _gpt2_small_shapes():
    """``GPT2Model.from_pretrained("gpt2").named_parameters()`` shapes, in its order."""
    d = GPT2_WIDTH
    shapes = [("wte.weight", (GPT2_VOCAB, d)), ("wpe.weight", (GPT2_CONTEXT, d))]
    for layer in range(GPT2_LAYERS):
        h = f"h.{layer}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)), (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)), (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)), (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)), (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)), (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)), (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return tuple(shapes)


CASES = (
    Case("mlp", "seed MLP 10-20-1", _seed_mlp_shapes(), in_quick=True),
    Case("many-small", "2000 x 1000", _many_small_shapes(), in_quick=True),
    Case("resnet50", "ResNet-50 shapes", _resnet50_shapes(), in_quick=False),
    Case("gpt2", "GPT-2 small shapes", _gpt2_small_shapes(), in_quick=True),
    Case("big-100m", "one 100M tensor", (("w", (100_000_000,)),), in_quick=False),
)
CASES_BY_NAME = {case.name: case for case in CASES}

# The published sizes, so that a typo in a shape list cannot go unnoticed.
_EXPECTED_SIZES = {
    "mlp": (4, 241),
    "many-small": (2000, 2_000_000),
    "resnet50": (161, 25_557_032),
    "gpt2": (148, 124_439_808),
    "big-100m": (1, 100_000_000),
}
for _case in CASES:
    assert (_case.num_tensors, _case.num_elements) == _EXPECTED_SIZES[_case.name], _case.name


def make_params(case, dtype, device, seed):
    """The case's parameters: leaf tensors, ``requires_grad=True``, N(0, 0.02) drawn in float32.

    The values are drawn on the CPU with a seeded generator, then converted to ``dtype`` and
    moved, so they are the same on every machine and (up to rounding) for every dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in case.shapes:
        values = torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
        params.append(values.to(device=device, dtype=dtype).requires_grad_())
    return params


def make_centers(params, seed):
    """Reference weights for the l2-center case: the parameters plus N(0, INIT_STD / 10) noise, as
    a fine-tuned model sits near its pretrained weights."""
    generator = torch.Generator().manual_seed(seed + 1)
    centers = []
    for p in params:
        noise = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, INIT_STD / 10, generator=generator)
        centers.append((p.detach().float().cpu() + noise).to(device=p.device, dtype=p.dtype))
    return centers


def make_adam_second_moment(params, seed, grad_std):
    """An Adam-like second moment per parameter, for the metric prox step: ``v = g²`` with ``g``
    N(0, ``grad_std``) drawn in float32 on the CPU (positive, spanning orders of magnitude as
    Adam's ``exp_avg_sq`` does), in the parameter's dtype and device."""
    generator = torch.Generator().manual_seed(seed + 2)
    second_moments = []
    for p in params:
        g = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, grad_std, generator=generator)
        second_moments.append(g.square_().clamp_(min=torch.finfo(torch.float32).tiny).to(device=p.device, dtype=p.dtype))
    return second_moments


def has_groups(case):
    return any(len(shape) >= 2 for _, shape in case.shapes)


def float64_reference(params, centers=None, chunk_elements=2**20):
    """Every penalty of bench.contenders in float64, independent of fastreg: ``{"l1": Σ|w|, "l2": Σw²,
    "group-rows": Σ‖rows‖ + Σw², "group-cols": Σ‖columns‖ + Σw², "l2-center": Σ(w - c)², "l2-S-settings":
    Σ_i 2^-(i mod S mod 4)·Σw_i²}``.

    Each chunk of at most ``chunk_elements`` is converted to float64 and summed by torch (pairwise);
    the chunk sums are added exactly by ``math.fsum``.
    """
    parts = {"l1": [], "l2": [], "rows": [], "cols": [], "l2-center": []}
    with torch.no_grad():
        for i, p in enumerate(params):
            flat = p.detach().reshape(-1)
            center = None if centers is None else centers[i].detach().reshape(-1)
            for start in range(0, flat.numel(), chunk_elements):
                chunk = flat[start:start + chunk_elements].double()
                parts["l1"].append(chunk.abs().sum().item())
                parts["l2"].append(chunk.square().sum().item())
                if center is not None:
                    parts["l2-center"].append((chunk - center[start:start + chunk_elements].double()).square()
                                              .sum().item())
            if p.ndim > 1:
                w = p.detach().double()
                parts["rows"].append(w.flatten(1).norm(dim=1).sum().item())
                parts["cols"].append(w.movedim(1, 0).flatten(1).norm(dim=1).sum().item())
                del w
    l2 = math.fsum(parts["l2"])
    per_tensor = [p.detach().double().square().sum().item() for p in params]
    settings = {name: math.fsum(2.0 ** -((i % count) % 4) * v for i, v in enumerate(per_tensor))
                for name, count in (("l2-2-settings", 2), ("l2-10-settings", 10))}
    return {"l1": math.fsum(parts["l1"]), "l2": l2, "group-rows": math.fsum(parts["rows"]) + l2,
            "group-cols": math.fsum(parts["cols"]) + l2, "l2-center": math.fsum(parts["l2-center"]), **settings}
