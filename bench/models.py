"""Real models for the training-step benchmark (``python -m bench.step``), built from ``torch.nn``
with no download: a small transformer LM with a tied head, a conv/BN/ReLU CNN, the seed article's
MLP. Each comes with a fixed synthetic batch and a task loss that reaches every parameter."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class TinyLM(nn.Module):
    """Token embedding, ``nn.TransformerEncoderLayer`` blocks (causal), LayerNorm, tied output head."""

    def __init__(self, vocab, width, heads, ff, layers, context):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens):
        length = tokens.shape[1]
        h = self.embedding(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.norm(self.blocks(h, mask=mask, is_causal=True))
        return h @ self.embedding.weight.t()  # the head is tied to the embedding

    def loss(self, batch):
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class SmallCNN(nn.Module):
    """VGG-style: blocks of (conv 3x3, BatchNorm, ReLU) x 2, max-pooling between, a linear head."""

    def __init__(self, widths, classes=10):
        super().__init__()
        layers, channels = [], 3
        for i, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

    def loss(self, batch):
        images, labels = batch
        return F.cross_entropy(self(images), labels)


class SeedMLP(nn.Sequential):
    """The seed article's SimpleNet: Linear(10, 20) -> ReLU -> Linear(20, 1), MSE loss."""

    def __init__(self):
        super().__init__(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1))

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    build: object  # () -> nn.Module
    batch: object  # (generator, device) -> batch

    def make(self, device, seed=0):
        torch.manual_seed(seed)
        model = self.build().to(device)
        generator = torch.Generator().manual_seed(seed + 1)
        return model, tuple(t.to(device) for t in self.batch(generator))


def _lm(vocab, width, heads, ff, layers, context, batch, name="lm"):
    return ModelSpec(
        name, f"transformer LM (vocab {vocab:,}, width {width}, {layers} layers, tied head; batch {batch}x{context})",
        lambda: TinyLM(vocab, width, heads, ff, layers, context),
        lambda g: (torch.randint(0, vocab, (batch, context), generator=g),
                   torch.randint(0, vocab, (batch, context), generator=g)))


def _cnn(widths, size, batch):
    return ModelSpec(
        "cnn", f"CNN (conv/BN/ReLU, widths {'-'.join(map(str, widths))}; batch {batch}x3x{size}x{size})",
        lambda: SmallCNN(widths),
        lambda g: (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)))


MLP = ModelSpec("mlp", "seed MLP 10-20-1 (batch 100)", SeedMLP,
                lambda g: (torch.randn(100, 10, generator=g), torch.randn(100, 1, generator=g)))

MODELS = {
    "full": [_lm(16384, 512, 8, 2048, 4, 32, 8), _cnn((64, 128, 256, 512), 32, 16), MLP,
             # GPT-2 small's shapes (124M parameters) on a tiny batch: the step is mostly memory
             # passes over the parameters, so what a penalty adds is resolvable on a CPU
             _lm(50257, 768, 12, 3072, 12, 8, 1, name="gpt2")],
    "quick": [_lm(2048, 128, 4, 512, 2, 16, 4), _cnn((16, 32, 64), 16, 8), MLP],
}
