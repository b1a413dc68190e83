"""``reg.attach(optimizer)`` inside the real Hugging Face ``Trainer`` (the ``hf`` extra:
transformers + accelerate). No download: a 1-layer BERT for sequence classification from a
config, randomly initialised, and a few random batches."""

import pytest
import torch

import fastreg

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
pytest.importorskip("accelerate", reason="the hf extra: pip install -e '.[hf]'")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

L2, L1, LR = 5e-3, 1e-2, 0.1


class Batches(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def train(model, optimizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                             max_grad_norm=1.0,  # gradient clipping on: the penalty's gradient comes after it
                             use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), optimizers=(optimizer, None))
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_attach_in_trainer_equals_sgd_weight_decay(tmp_path):
    reference = tiny_bert()
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, weight_decay=fastreg.l2_to_weight_decay(L2))
    expected = train(reference, sgd, tmp_path / "wd")

    model = tiny_bert()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    handle = fastreg.Penalty(model, l2=L2).attach(sgd)
    got = train(model, sgd, tmp_path / "attach")
    assert handle.last_value is not None and handle.last_value > 0
    untouched = tiny_bert()
    moved = 0
    for name, p in got.items():
        torch.testing.assert_close(p, expected[name], rtol=2e-5, atol=2e-6, msg=name)
        moved += int(not torch.equal(p, dict(untouched.named_parameters())[name].detach()))
    assert moved > 10  # it did train


def test_attach_prox_in_trainer_gives_exact_zeros(tmp_path):
    model = tiny_bert()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    reg = fastreg.Penalty(model, l1=L1, exclude=["bias_and_norm", "embeddings"])
    handle = reg.attach(sgd, mode="prox")
    train(model, sgd, tmp_path)
    sparsity = fastreg.sparsity(model, exclude=["bias_and_norm", "embeddings"])
    assert sparsity.zeros > 0.2 * sparsity.numel  # the soft threshold lr·l1 per step zeroes weights exactly
    embeddings = model.bert.embeddings.word_embeddings.weight
    initial = tiny_bert().bert.embeddings.word_embeddings.weight
    assert (embeddings == 0).sum() == (initial == 0).sum()  # excluded by the "embeddings" preset (padding row only)
    assert handle.last_value is not None


def test_attach_prox_with_adamw_in_trainer_steps_in_its_metric(tmp_path):
    # AdamW inside the real Trainer: the proximal step in AdamW's own metric (threshold
    # lr·l1/D per coordinate) gives exact zeros, and differs from the Euclidean step by name.
    results = {}
    for metric in ("optimizer", "euclidean"):
        model = tiny_bert()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        reg = fastreg.Penalty(model, l1=1e-3, exclude=["bias_and_norm", "embeddings"])
        reg.attach(adamw, mode="prox", metric=metric)
        train(model, adamw, tmp_path / metric)
        results[metric] = fastreg.sparsity(model, exclude=["bias_and_norm", "embeddings"])
    assert results["optimizer"].zeros > 0.05 * results["optimizer"].numel
    assert results["optimizer"].zeros != results["euclidean"].zeros
