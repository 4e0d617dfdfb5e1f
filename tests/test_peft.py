"""PEFT on every family through PEFT's own API: default target modules (LoRA, its relatives, IA3), heads saved with
the adapter, `merge_and_unload`, `PeftModel.from_pretrained`, prompt tuning."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, HEADS, head_config
from peft import (
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.utils import constants
from peft.utils.other import ModulesToSaveWrapper

import hf_extras
from hf_extras.peft_maps import FAMILY_TARGETS

# head -> PEFT task type (masked LM has none: the generic PeftModel) and the head module PEFT must save
TASK_TYPES = {
    "ForSequenceClassification": ("SEQ_CLS", "score"),
    "ForTokenClassification": ("TOKEN_CLS", "score"),
    "ForQuestionAnswering": ("QUESTION_ANS", "qa_outputs"),
    "ForCausalLM": ("CAUSAL_LM", None),
    "ForMaskedLM": (None, None),
    "Model": ("FEATURE_EXTRACTION", None),
}


def ids_and_mask(batch: int = 2, seq: int = 10):
    ids = torch.randint(5, 90, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return ids, mask


def first_output(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def test_every_peft_target_map_knows_every_family():
    maps = {
        name: value
        for name, value in vars(constants).items()
        if name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("MODULES_MAPPING")
    }
    assert len(maps) > 20  # LoRA and its copies (LoHa, LoKr, OFT, BOFT, VeRA, ...), IA3, LN tuning, ...
    for name, mapping in maps.items():
        for model_type in FAMILY_TARGETS:
            assert mapping.get(model_type), f"{name} lacks {model_type}"
    for model_type in FAMILY_TARGETS:
        ia3 = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
        assert set(feedforward) <= set(ia3)  # PEFT requires feed-forward modules to be IA3 targets


@pytest.mark.parametrize("head", list(TASK_TYPES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_lora_without_target_modules(family, head):
    task_type, saved_head = TASK_TYPES[head]
    model = family.cls(head)(head_config(family, head))
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, r=4))
    adapted = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    # every default target the model has (a Mamba stack has no q/v unless a hybrid schedule adds attention blocks)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    expected = set(FAMILY_TARGETS[model.config.model_type].lora) & present
    assert adapted == expected and adapted
    if saved_head is not None:
        assert isinstance(peft_model.base_model.model.get_submodule(saved_head), ModulesToSaveWrapper)
    ids, mask = ids_and_mask()
    assert torch.isfinite(first_output(peft_model(input_ids=ids, attention_mask=mask))).all()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_merge_and_unload_gives_identical_outputs(family):
    # larger weights than the default 0.02, so that a LoRA update on q/v shows in the pooled logits
    config = head_config(family, "ForSequenceClassification", initializer_range=0.3)
    model = family.cls("ForSequenceClassification")(config).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    # random (not zero) LoRA B, so the adapter changes the outputs and merging has something to merge
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, attention_mask=mask).logits
        merged = peft_model.merge_and_unload()
        merged_out = merged(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged_out, adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_peft_from_pretrained_round_trip_saves_the_head(family, tmp_path):
    head = "ForTokenClassification"
    model = family.cls(head)(head_config(family, head))
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=4, init_lora_weights=False)).eval()
    with torch.no_grad():  # a trained head differs from the base's: it must come from the adapter folder
        peft_model.base_model.model.score.modules_to_save["default"].weight.add_(0.5)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any("score" in k for k in keys) and not any("embed_tokens" in k for k in keys)

    base = HEADS[head].from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_ia3_default_targets_and_a_step(family):
    model = family.cls("ForSequenceClassification")(head_config(family, "ForSequenceClassification"))
    peft_model = get_peft_model(model, IA3Config(task_type="SEQ_CLS"))
    targets = FAMILY_TARGETS[model.config.model_type]
    layers = {name.rsplit(".", 1)[-1]: m for name, m in peft_model.named_modules() if isinstance(m, IA3Layer)}
    assert set(layers) <= set(targets.ia3) and layers
    for name, layer in layers.items():  # feed-forward layers scale their input, the others their output
        assert layer.is_feedforward == (name in targets.ia3_feedforward)
    vectors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "ia3_l" in n}
    ids, mask = ids_and_mask()
    loss = peft_model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss
    loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, vectors[n]) for n, p in peft_model.named_parameters() if n in vectors)


@pytest.mark.parametrize("config", [LoHaConfig, LoKrConfig, LNTuningConfig], ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_lora_relatives_find_their_default_targets(family, config):
    model = family.cls("ForCausalLM")(head_config(family, "ForCausalLM"))
    peft_model = get_peft_model(model, config(task_type="CAUSAL_LM"))
    assert 0 < peft_model.get_nb_trainable_parameters()[0] < model.num_parameters()
    ids, mask = ids_and_mask()
    assert torch.isfinite(peft_model(input_ids=ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForCausalLM"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_prompt_tuning_forward_and_step(family, head):
    task_type = TASK_TYPES[head][0]
    model = family.cls(head)(head_config(family, head)).eval()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=4))
    ids, mask = ids_and_mask()
    labels = torch.tensor([0, 2]) if head == "ForSequenceClassification" else ids.masked_fill(mask == 0, -100)

    # the virtual tokens are prepended embeddings, unmasked, ahead of the (left-padded) input
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        prompt = peft_model.get_prompt(batch_size=2)
        embeds = torch.cat([prompt, model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], dim=1)
        reference = model(inputs_embeds=embeds, attention_mask=full_mask).logits
    torch.testing.assert_close(out.logits, reference)
    assert torch.isfinite(out.loss)

    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("prompt_encoder" in n for n in trainable)
    assert all("prompt_encoder" in n or "score" in n for n in trainable)
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@pytest.mark.xfail(
    strict=True,
    reason="upstream: peft 0.21's prepare_inputs_for_generation looks for `past_key_values`, transformers 5.24 "
    "passes `cache`, so the virtual tokens are prepended again at every decoding step (transformers' Llama "
    "fails the same way)",
)
def test_prompt_tuning_generate_matches_uncached_greedy():
    family = FAMILIES[0]
    model = family.cls("ForCausalLM")(head_config(family, "ForCausalLM", initializer_range=0.3)).eval()
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = torch.randint(5, 90, (1, 6))
    generated = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
    )
    sequence = ids
    with torch.no_grad():
        for _ in range(4):
            embeds = torch.cat([peft_model.get_prompt(1), model.get_input_embeddings()(sequence)], dim=1)
            next_id = model(inputs_embeds=embeds, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_id], dim=1)
    assert generated.tolist() == sequence.tolist()


def test_mlp_mixer_image_classification_lora_saves_its_head(tmp_path):
    from transformers import AutoModelForImageClassification

    config = hf_extras.MlpMixerConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24, channels_mlp_dim=64,
        num_labels=5,
    )  # fmt: skip
    model = hf_extras.MlpMixerForImageClassification(config)
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, modules_to_save=["head"], init_lora_weights=False)).eval()
    adapted = {name.split(".lora_")[0] for name, _ in peft_model.named_parameters() if "lora_" in name}
    assert adapted and all(".mlp_channels." in name for name in adapted)  # the token MLP slices its weights
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = peft_model(pixel_values=pixels).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForImageClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, expected, rtol=0, atol=0)
