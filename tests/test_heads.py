"""Every head of every family: loss, gradients, save/load, Auto resolution, MoE, layer features."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, HEADS, head_config

HEAD_NAMES = [h for h in HEADS if h != "Model"]


def batch_for(head: str, vocab: int, batch: int = 2, seq: int = 13):
    input_ids = torch.randint(7, vocab, (batch, seq))
    mask = torch.ones_like(input_ids)
    mask[0, -3:] = 0  # right padding in the first row
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if head in ("ForCausalLM", "ForMaskedLM"):
        labels = input_ids.clone()
        labels[mask == 0] = -100
        inputs["labels"] = labels
    elif head == "ForSequenceClassification":
        inputs["labels"] = torch.tensor([0, 2])
    elif head == "ForTokenClassification":
        labels = torch.randint(0, 3, (batch, seq))
        labels[mask == 0] = -100
        inputs["labels"] = labels
    elif head == "ForQuestionAnswering":
        inputs["start_positions"] = torch.tensor([1, 4])
        inputs["end_positions"] = torch.tensor([3, 9])
    return inputs


def output_tensor(out):
    return (
        out.logits
        if hasattr(out, "logits") and out.logits is not None
        else (out.start_logits if hasattr(out, "start_logits") else out.last_hidden_state)
    )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("ffn_type", ["glu", "moe"])
def test_head_trains_and_round_trips(family, head, ffn_type, tmp_path):
    config = head_config(family, head, ffn_type=ffn_type, num_experts=4)
    model = family.cls(head)(config)
    inputs = batch_for(head, config.vocab_size)
    out = model(**inputs)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) > 0.9 * len(grads)

    model.eval()
    model.save_pretrained(tmp_path)
    auto = HEADS[head]
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    eval_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(
            output_tensor(reloaded(**eval_inputs)), output_tensor(model(**eval_inputs)), rtol=0, atol=0
        )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_auto_classes_resolve(family):
    for head, auto in HEADS.items():
        config = head_config(family, head) if head != "Model" else family.config()
        model = auto.from_config(config)
        assert type(model) is family.cls(head), head


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_head_direction_rules(family):
    with pytest.raises(ValueError, match="bidirectional=False"):
        family.cls("ForCausalLM")(family.config(bidirectional=True))
    with pytest.raises(ValueError, match="bidirectional=True"):
        family.cls("ForMaskedLM")(family.config(bidirectional=False))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_padding_does_not_leak_in_bidirectional_classification(family):
    """Right padding must not change a bidirectional classifier's prediction for the real tokens."""
    config = family.config(bidirectional=True, num_labels=3)
    model = family.cls("ForSequenceClassification")(config).eval()
    ids = torch.randint(7, config.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        alone = model(ids).logits
        with_pad = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_sequence_pair_classification_with_separator(family):
    """Text pairs come in as one sequence joined by the separator; the head trains on them."""
    from hf_extras.data import build_byte_tokenizer

    tok = build_byte_tokenizer()
    enc = tok(["a cat", "the dog runs"], ["sits", "fast"], padding=True, return_tensors="pt")
    assert (enc["input_ids"] == tok.sep_token_id).sum(1).tolist() == [2, 2]
    config = family.config(vocab_size=264, num_labels=2)
    model = family.cls("ForSequenceClassification")(config)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_weighted_layer_features(family):
    config = family.config(num_labels=3, use_layer_features=True)
    model = family.cls("ForSequenceClassification")(config)
    assert model.layer_features.layer_weights.shape == (config.num_hidden_layers + 1,)
    out = model(**batch_for("ForSequenceClassification", config.vocab_size))
    out.loss.backward()
    assert model.layer_features.layer_weights.grad is not None


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_moe_aux_loss_is_added(family):
    config = family.config(ffn_type="moe", num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    model = family.cls("ForCausalLM")(config)
    inputs = batch_for("ForCausalLM", config.vocab_size)
    out = model(**inputs)
    base = model.model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert base.aux_loss is not None and base.aux_loss > 0
    plain = model.loss_function(logits=out.logits, labels=inputs["labels"], vocab_size=config.vocab_size)
    torch.testing.assert_close(out.loss, plain + 0.5 * base.aux_loss)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_gradient_accumulation_matches_one_batch(family, tmp_path):
    """Trainer with accumulation 2 x batch 2 gives the same update as batch 4 (the loss-scaling trap)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    config = family.config()
    ids = torch.randint(7, config.vocab_size, (4, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # unequal token counts per micro-batch: a plain mean of means would differ
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})

    def train(bs, accum):
        torch.manual_seed(0)
        model = family.cls("ForCausalLM")(config)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"a{accum}"),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_steps=1,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            dataloader_drop_last=False,
            lr_scheduler_type="constant",
            optim="sgd",
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(train(2, 2), train(4, 1), rtol=1e-5, atol=1e-6)


def test_moe_aux_share_sums_to_one_over_micro_batches():
    """Weighted by token share, micro-batch aux terms add up to the token-weighted mean (as one batch)."""
    from hf_extras.models.heads import scaled_aux_loss

    labels = torch.tensor([[1, 2, -100, -100], [1, 2, 3, 4]])
    total = labels[..., 1:].ne(-100).sum()
    parts = [scaled_aux_loss(torch.tensor(1.0), 1.0, labels[i : i + 1], total, shift=True) for i in range(2)]
    torch.testing.assert_close(sum(parts), torch.tensor(1.0))
    assert parts[0] < parts[1]
