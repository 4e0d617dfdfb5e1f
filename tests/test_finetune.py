"""The fine-tuning method switch: every family x task head x {full, LoRA, bottleneck adapter} trains and reloads;
frozen-backbone weighted layer features; `hf-extras train` with `finetune_method: lora / adapter`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, HEADS, head_config

from hf_extras.errors import ConfigError
from hf_extras.finetune import FinetuneArguments, apply_finetune_method, load_finetuned, save_finetuned

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TASK_HEADS = ["ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]


def batch_for(head: str, vocab_size: int = 96) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in one row
    batch = {"input_ids": ids, "attention_mask": mask}
    if head == "ForSequenceClassification":
        batch["labels"] = torch.tensor([0, 2])
    elif head == "ForTokenClassification":
        batch["labels"] = torch.randint(0, 3, ids.shape, generator=gen).masked_fill(mask == 0, -100)
    else:
        batch["start_positions"], batch["end_positions"] = torch.tensor([2, 3]), torch.tensor([5, 4])
    return batch


def outputs_of(model, batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(**inputs)
    return (
        out.logits
        if hasattr(out, "logits") and out.logits is not None
        else torch.stack([out.start_logits, out.end_logits])
    )


def train_steps(model, batch, steps: int = 2) -> list[float]:
    """`steps` AdamW steps; two, so that LoRA A / adapter down (zero gradient while B / up is zero) move too."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
@pytest.mark.parametrize("head", TASK_HEADS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_method_trains_a_step_and_round_trips(family, head, method, tmp_path):
    torch.manual_seed(0)
    model = family.cls(head)(head_config(family, head))
    args = FinetuneArguments(finetune_method=method, adapter_size=4, lora_r=4)
    model, counts = apply_finetune_method(model, args, output_dir=tmp_path)
    if method == "full":
        assert counts["trainable_parameters"] == counts["total_parameters"]
    else:
        assert 0 < counts["trainable_parameters"] < counts["total_parameters"]
        assert (tmp_path / "base_model" / "config.json").is_file()  # a model built from a config: its base is saved

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = batch_for(head)
    losses = train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (
        f"trainable but unchanged: {trainable - changed}; frozen but changed: {changed - trainable}"
    )
    head_name = "qa_outputs" if head == "ForQuestionAnswering" else "score"
    assert any(head_name in n for n in changed)  # the task head trains with every method
    if method != "full":
        assert any(("lora_" in n or "bottleneck_adapters" in n) for n in changed)

    expected = outputs_of(model, batch)
    save_finetuned(model, tmp_path / "run", args)
    reloaded = load_finetuned(tmp_path / "run", HEADS[head]).eval()
    torch.testing.assert_close(outputs_of(reloaded, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_mlp_mixer_image_classification_methods(method, tmp_path):
    from transformers import AutoModelForImageClassification

    import hf_extras

    config = hf_extras.MlpMixerConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24, channels_mlp_dim=64,
        num_labels=5,
    )  # fmt: skip
    model, counts = apply_finetune_method(
        hf_extras.MlpMixerForImageClassification(config), FinetuneArguments(finetune_method=method, adapter_size=4),
        output_dir=tmp_path,
    )  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head" in n.split(".") for n in trainable)  # PEFT has no image task type: `head` saved explicitly
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    assert all(torch.isfinite(torch.tensor(train_steps(model, batch))))
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"]).logits
    save_finetuned(model, tmp_path / "run", FinetuneArguments(finetune_method=method))
    reloaded = load_finetuned(tmp_path / "run", AutoModelForImageClassification).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=batch["pixel_values"]).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES[:1] + FAMILIES[-2:], ids=lambda f: f.name)
def test_frozen_backbone_trains_only_layer_weights_scale_and_head(family):
    torch.manual_seed(0)
    model = family.cls("ForSequenceClassification")(
        head_config(family, "ForSequenceClassification", use_layer_features=True)
    )
    model, counts = apply_finetune_method(model, FinetuneArguments(freeze_backbone=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer_features.layer_weights", "layer_features.scale", "score.weight"}
    assert counts["trainable_parameters"] == model.config.num_hidden_layers + 1 + 1 + 3 * model.config.hidden_size
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, batch_for("ForSequenceClassification"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_bad_finetune_arguments_name_the_key():
    with pytest.raises(ConfigError, match="freeze_backbone"):
        FinetuneArguments(finetune_method="lora", freeze_backbone=True)
    with pytest.raises(ConfigError, match="adapter_placement"):
        FinetuneArguments(finetune_method="adapter", adapter_placement="middle")
    with pytest.raises(ConfigError, match="lora_r"):
        FinetuneArguments(finetune_method="lora", lora_r=0)


def test_prompt_tuning_refuses_token_level_heads():
    family = FAMILIES[0]
    model = family.cls("ForTokenClassification")(head_config(family, "ForTokenClassification"))
    with pytest.raises(ConfigError, match="prompt_tuning"):
        apply_finetune_method(model, FinetuneArguments(finetune_method="prompt_tuning"))


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_cli_train_with_method(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_extras.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "spam and eggs " * 8}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    status = main([
        "train", str(QUICKSTART), f"--output_dir={out}", f"--finetune_method={method}", f"--dataset_name={data}",
        "--validation_fraction=0.2", "--max_steps=2", "--hidden_size=32", "--num_hidden_layers=1", "--num_heads=2",
        "--block_size=16", "--per_device_train_batch_size=2", "--per_device_eval_batch_size=2",
        "--max_train_samples=8", "--max_eval_samples=4", "--eval_strategy=no", "--logging_steps=1",
        "--sample_max_new_tokens=4", "--disable_tqdm=true",
    ])  # fmt: skip
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetune_method"] == method and metrics["steps"] == 2
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert metrics["trainable_percent"] == pytest.approx(
        100 * metrics["trainable_parameters"] / metrics["total_parameters"]
    )
    saved = "adapter_model.safetensors" if method == "lora" else "bottleneck_adapter.safetensors"
    assert (out / saved).is_file() and not (out / "model.safetensors").exists()
    model = load_finetuned(out, AutoModelForCausalLM)
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
