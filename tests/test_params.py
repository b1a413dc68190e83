"""Parameter selection: the accepted forms of params and exclude, and bad input."""

import pytest
import torch
from torch import nn

import fastreg
from fastreg._params import select


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def names(reg):
    return [name for name, _ in reg.named_parameters()]


def test_module_selects_all_trainable_parameters():
    assert names(fastreg.Penalty(Block())) == [
        "conv.weight", "conv.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]


def test_exclude_bias_and_norm_skips_every_tensor_with_ndim_at_most_one():
    assert names(fastreg.Penalty(Block(), exclude="bias_and_norm")) == ["conv.weight", "head.weight"]


def test_exclude_glob_patterns():
    reg = fastreg.Penalty(Block(), exclude=["*.bias", "norm.*"])
    assert names(reg) == ["conv.weight", "head.weight"]
    assert "matches '*.bias'" in reg.explain()


def test_exclude_callable():
    reg = fastreg.Penalty(Block(), exclude=lambda name, t: name.startswith("head") or t.ndim == 4)
    assert names(reg) == ["conv.bias", "norm.weight", "norm.bias"]


def test_iterables_of_tensors_pairs_and_mappings():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    assert names(fastreg.Penalty([a, b])) == ["[0]", "[1]"]
    assert names(fastreg.Penalty(iter([("a", a), ("b", b)]), exclude=["b"])) == ["a"]
    assert names(fastreg.Penalty({"a": a, "b": b})) == ["a", "b"]
    assert names(fastreg.Penalty(a)) == ["[0]"]  # a lone tensor is one parameter, not its rows


def test_a_generator_is_consumed_once_and_kept():
    model = Block()
    reg = fastreg.Penalty(model.parameters(), l2=1.0)
    assert len(reg.named_parameters()) == 6
    assert reg().item() == reg().item() > 0


def test_selection_records_why_each_tensor_is_excluded():
    model = Block()
    model.conv.weight.requires_grad_(False)
    entries = {e.name: e for e in select(model, exclude="bias_and_norm")}
    assert entries["conv.weight"].excluded_because == "requires_grad=False"
    assert entries["norm.bias"].excluded_because == "bias_and_norm (ndim=1)"
    assert entries["head.weight"].included


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_non_float_parameters_are_rejected_by_name(dtype):
    bad = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=r"'bad'.*" + str(dtype).replace("torch.", "")):
        fastreg.penalty([("good", torch.randn(2)), ("bad", bad)], l2=1.0)


def test_non_float_parameter_can_be_excluded():
    reg = fastreg.Penalty([("w", torch.randn(2)), ("step", torch.zeros(1, dtype=torch.int64))], exclude=["step"])
    assert names(reg) == ["w"]


@pytest.mark.parametrize("params", [3, "weights", None, [1.0, 2.0], [("a", 1.0)], [("a", torch.ones(1), 3)]],
                         ids=["int", "str", "None", "floats", "pair-of-float", "triple"])
def test_things_that_are_not_parameters_are_rejected(params):
    with pytest.raises(TypeError, match="fastreg"):
        fastreg.penalty(params, l2=1.0)


@pytest.mark.parametrize("exclude, error", [("bias", ValueError), (3, TypeError), ([1], TypeError)])
def test_bad_exclude_is_rejected(exclude, error):
    with pytest.raises(error, match="exclude"):
        fastreg.Penalty(Block(), exclude=exclude)


def test_glob_match_agrees_with_fnmatch():
    # fastreg matches globs in plain Python (traceable by torch.compile); fnmatch is the reference.
    import fnmatch
    import random

    from fastreg._params import glob_match

    rng = random.Random(0)
    patterns = ["*", "*.bias", "a?c", "[ab]*", "[!a]*", "a*b*c", "[a-c].b", "[]]x", "[!]]*", "**", "",
                "a[", "[a-]x", "*a*a*a", "x[!b-c]", "[!", "[", "[]", "[!]", "blocks.*.ln_?.weight"]
    patterns += ["".join(rng.choice("ab.c]![-*?") for _ in range(rng.randint(0, 7))) for _ in range(300)]
    names = ["".join(rng.choice("abc.x]-![") for _ in range(rng.randint(0, 7))) for _ in range(150)]
    names += ["blocks.3.ln_1.weight", "blocks.10.ln_2.bias"]
    for pattern in patterns:
        for name in names:
            assert glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (name, pattern)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.bag = nn.EmbeddingBag(7, 4)
        self.block = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)


def test_exclude_mixes_presets_and_globs_and_explains_each_reason():
    model = TinyLM()
    reg = fastreg.Penalty(model, l2=1e-4, exclude=["bias_and_norm", "embeddings", "lm_head.*"])
    assert [name for name, _ in reg.named_parameters()] == ["block.weight"]
    reasons = {e.name: e.excluded_because for e in select(model, ["bias_and_norm", "embeddings", "lm_head.*"])}
    assert reasons["wte.weight"] == "embeddings (nn.Embedding)"
    assert reasons["bag.weight"] == "embeddings (nn.EmbeddingBag)"
    assert reasons["block.bias"] == "bias_and_norm (ndim=1)" and reasons["norm.weight"] == "bias_and_norm (ndim=1)"
    assert reasons["lm_head.weight"] == "matches 'lm_head.*'"
    table = reg.explain()
    assert "no: embeddings (nn.Embedding)" in table and "no: matches 'lm_head.*'" in table
    assert [n for n, _ in fastreg.Penalty(model, exclude="embeddings").named_parameters()][:2] == ["block.weight",
                                                                                                  "block.bias"]


def test_a_tied_head_is_excluded_with_its_embedding():
    model = TinyLM()
    model.lm_head.weight = model.wte.weight  # GPT-2 style tying: one tensor, counted once
    names = [n for n, _ in fastreg.Penalty(model, exclude=["embeddings"]).named_parameters()]
    assert "lm_head.weight" not in names and "wte.weight" not in names


def test_the_embeddings_preset_needs_a_module():
    model = TinyLM()
    with pytest.raises(ValueError, match="exclude='embeddings' finds the weights of nn.Embedding"):
        fastreg.Penalty(list(model.named_parameters()), exclude=["embeddings"])
    with pytest.raises(ValueError, match="unknown exclude 'embedding'"):
        fastreg.Penalty(model, exclude="embedding")
