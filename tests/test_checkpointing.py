"""Activation checkpointing (`activation_checkpointing_enable()`, formerly `gradient_checkpointing_enable()`) on every
family and head: the blocks really are recomputed in the backward pass, and loss and gradients are the same as
without checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, HEADS, head_config
from test_mlp_mixer import VOCAB, image_config, text_config
from transformers.modeling_layers import GradientCheckpointingLayer

import hf_extras

TRAIN_HEADS = [h for h in HEADS if h != "Model"]


def _inputs(head: str, batch: int = 2, seq: int = 20, vocab: int = 96) -> dict:
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the mask travels through the checkpointed blocks too
    inputs = {"input_ids": ids, "attention_mask": mask}
    if head == "ForSequenceClassification":
        inputs["labels"] = torch.tensor([0, 2])
    elif head == "ForQuestionAnswering":
        inputs.update(start_positions=torch.tensor([4, 5]), end_positions=torch.tensor([6, 9]))
    elif head in ("ForTokenClassification",):
        inputs["labels"] = torch.randint(0, 3, (batch, seq))
    else:
        inputs["labels"] = ids
    return inputs


def _loss_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_checkpointing_matches(model, inputs, enable: str = "activation_checkpointing_enable") -> None:
    """Same loss and gradients with checkpointing, and every checkpointed layer ran forward twice (recompute)."""
    model.train()
    plain_loss, plain_grads = _loss_and_grads(model, inputs)
    checkpointed = copy.deepcopy(model)
    getattr(checkpointed, enable)()
    layers = [m for m in checkpointed.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m.gradient_checkpointing for m in layers)
    calls = []
    for layer in layers:  # transformers checkpoints the layer's `forward`: its children's hooks run again on recompute
        next(layer.children()).register_forward_pre_hook(lambda module, args: calls.append(module))
    loss, grads = _loss_and_grads(checkpointed, inputs)
    assert len(calls) == 2 * len(layers), "the blocks were not recomputed in the backward pass"
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("head", TRAIN_HEADS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_checkpointed_gradients_match(family, head):
    model = family.cls(head)(head_config(family, head))
    assert_checkpointing_matches(model, _inputs(head))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_deprecated_gradient_checkpointing_enable_still_checkpoints():
    family = FAMILIES[0]
    model = family.cls("ForCausalLM")(family.config())
    assert_checkpointing_matches(model, _inputs("ForCausalLM"), enable="gradient_checkpointing_enable")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("retnet", "mamba")], ids=lambda f: f.name)
def test_checkpointing_with_moe_and_layer_features(family):
    """MoE (aux loss through the checkpointed FFN) and weighted layer features (every layer's output is used)."""
    config = family.config(ffn_type="moe", num_experts=4, num_experts_per_tok=2, use_layer_features=True)
    assert_checkpointing_matches(family.cls("ForCausalLM")(config), _inputs("ForCausalLM"))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name != "linear_attention"], ids=lambda f: f.name)
def test_checkpointed_seq2seq_matches(family):
    model = family.cls("ForConditionalGeneration")(family.config())
    src = torch.randint(7, 96, (2, 11))
    mask = torch.ones_like(src)
    mask[0, -3:] = 0
    assert_checkpointing_matches(
        model, {"input_ids": src, "attention_mask": mask, "labels": torch.randint(7, 96, (2, 7))}
    )


@pytest.mark.parametrize(
    "head",
    [
        hf_extras.MlpMixerForCausalLM,
        hf_extras.MlpMixerForSequenceClassification,
        hf_extras.MlpMixerForTokenClassification,
    ],
)
def test_checkpointed_mlp_mixer_text_matches(head):
    name = head.__name__.removeprefix("MlpMixer")
    inputs = _inputs(name, seq=12, vocab=VOCAB)
    inputs.pop("attention_mask")
    assert_checkpointing_matches(head(text_config()), inputs)


def test_checkpointed_mlp_mixer_image_matches():
    model = hf_extras.MlpMixerForImageClassification(image_config())
    assert_checkpointing_matches(model, {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([1, 4])})
