"""MLP-Mixer family: image and text modes, presets, image processor, pipeline, timm conversion, digits task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, run_without_hf_extras
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from hf_extras import (
    MlpMixerConfig,
    MlpMixerForCausalLM,
    MlpMixerForImageClassification,
    MlpMixerForSequenceClassification,
    MlpMixerForTokenClassification,
    MlpMixerImageProcessor,
    MlpMixerModel,
)
from hf_extras.convert import (
    convert_timm_mixer_state_dict,
    import_timm_mixer,
    load_timm_mixer,
    mlp_mixer_config_from_timm,
    timm_mixer_image_processor,
    timm_mixer_key_to_hf,
)
from hf_extras.models.norms import DyT

VOCAB, WINDOW = 40, 16


def image_config(**overrides):
    values = dict(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24,
        channels_mlp_dim=64, num_labels=5, id2label={i: f"class_{i}" for i in range(5)},
    )  # fmt: skip
    values.update(overrides)
    return MlpMixerConfig(**values)


def text_config(**overrides):
    values = dict(
        modality="text", vocab_size=VOCAB, max_position_embeddings=WINDOW, hidden_size=32, num_hidden_layers=2,
        tokens_mlp_dim=24, channels_mlp_dim=64, num_labels=3,
    )  # fmt: skip
    values.update(overrides)
    return MlpMixerConfig(**values)


def random_ids(batch=2, seq=12):
    return torch.randint(3, VOCAB, (batch, seq))


# ------------------------------------------------------------------------------------------------------------------
# config and presets
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, millions",
    [("S/16", 18.5), ("B/16", 59.9), ("L/16", 208.2), ("S/32", 19.1), ("B/32", 60.3), ("L/32", 206.9)],
)
def test_preset_parameter_counts_match_the_paper(name, millions):
    config = MlpMixerConfig.from_preset(name, num_labels=1000)
    assert (config.image_size, config.patch_size) == (224, int(name.split("/")[1]))
    with torch.device("meta"):
        model = MlpMixerForImageClassification(config)
    assert round(model.num_parameters() / 1e6, 1) == millions


def test_presets_have_the_papers_sizes_and_take_overrides():
    config = MlpMixerConfig.from_preset("B/16", num_labels=10, image_size=384)
    sizes = (config.hidden_size, config.num_hidden_layers, config.tokens_mlp_dim, config.channels_mlp_dim)
    assert sizes == (768, 12, 384, 3072)
    assert config.num_patches == 24 * 24 and config.num_labels == 10
    small = MlpMixerConfig.from_preset("s/16")
    assert (small.hidden_size, small.num_hidden_layers, small.tokens_mlp_dim, small.channels_mlp_dim) == (
        512,
        8,
        256,
        2048,
    )
    large = MlpMixerConfig.from_preset("L/16")
    assert (large.hidden_size, large.num_hidden_layers, large.tokens_mlp_dim, large.channels_mlp_dim) == (
        1024,
        24,
        512,
        4096,
    )
    with pytest.raises(ValueError, match="unknown MLP-Mixer preset"):
        MlpMixerConfig.from_preset("H/14")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=30, patch_size=8), "image_size"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(tokens_mlp_dim=-1), "tokens_mlp_dim"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(hidden_dropout=1.0), "hidden_dropout"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(layer_norm_eps=0.0), "norm_eps"),  # the old name still validates
        (dict(pad_token_id=99, vocab_size=50), "pad_token_id"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        MlpMixerConfig(**overrides)


def test_strict_choices_are_enforced():
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError):
        MlpMixerConfig(norm_type="rmsnorm")
    with pytest.raises(StrictDataclassError):
        MlpMixerConfig(modality="audio")


# ------------------------------------------------------------------------------------------------------------------
# image mode
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", ["layernorm", "dyt"])
def test_image_shapes_and_pooling(norm_type):
    config = image_config(norm_type=norm_type)
    model = MlpMixerModel(config).eval()
    pixels = torch.randn(3, 3, 16, 16)
    out = model(pixel_values=pixels, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 16, 32)  # (16 / 4)^2 patches
    assert out.pooler_output.shape == (3, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(model(pixels).last_hidden_state, out.last_hidden_state)  # positional pixel_values
    norm_class = DyT if norm_type == "dyt" else nn.LayerNorm
    assert isinstance(model.blocks[0].norm1, norm_class) and isinstance(model.norm, norm_class)

    classifier = MlpMixerForImageClassification(config).eval()
    assert classifier(pixel_values=pixels).logits.shape == (3, 5)


def test_image_input_errors_are_clear():
    model = MlpMixerForImageClassification(image_config())
    with pytest.raises(ValueError, match="image_size"):
        model(pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_channels"):
        model(pixel_values=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="modality='text'"):
        MlpMixerModel(image_config())(input_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="modality='image'"):
        MlpMixerForImageClassification(text_config())
    for head in (MlpMixerForCausalLM, MlpMixerForSequenceClassification, MlpMixerForTokenClassification):
        with pytest.raises(ValueError, match="modality='text'"):
            head(image_config())


def test_auto_classes_resolve():
    assert type(AutoModelForImageClassification.from_config(image_config())) is MlpMixerForImageClassification
    assert type(AutoModel.from_config(image_config())) is MlpMixerModel
    assert type(AutoModelForCausalLM.from_config(text_config())) is MlpMixerForCausalLM
    sequence = AutoModelForSequenceClassification.from_config(text_config(bidirectional=True))
    assert type(sequence) is MlpMixerForSequenceClassification
    assert (
        type(AutoModelForTokenClassification.from_config(text_config(bidirectional=True)))
        is MlpMixerForTokenClassification
    )


# ------------------------------------------------------------------------------------------------------------------
# every head: one training step, save/load
# ------------------------------------------------------------------------------------------------------------------


def image_batch():
    return {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 4])}


def text_batch(head):
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    if head is MlpMixerForCausalLM:
        labels = ids.masked_fill(mask == 0, -100)
    elif head is MlpMixerForSequenceClassification:
        labels = torch.tensor([0, 2])
    else:
        labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


HEAD_CASES = [
    ("image-layernorm", MlpMixerForImageClassification, AutoModelForImageClassification, lambda: image_config()),
    (
        "image-dyt",
        MlpMixerForImageClassification,
        AutoModelForImageClassification,
        lambda: image_config(norm_type="dyt"),
    ),
    ("causal-lm", MlpMixerForCausalLM, AutoModelForCausalLM, lambda: text_config()),
    (
        "seq-cls",
        MlpMixerForSequenceClassification,
        AutoModelForSequenceClassification,
        lambda: text_config(bidirectional=True),
    ),
    ("seq-cls-causal", MlpMixerForSequenceClassification, AutoModelForSequenceClassification, lambda: text_config()),
    (
        "tok-cls",
        MlpMixerForTokenClassification,
        AutoModelForTokenClassification,
        lambda: text_config(bidirectional=True),
    ),
    (
        "tok-cls-dyt",
        MlpMixerForTokenClassification,
        AutoModelForTokenClassification,
        lambda: text_config(bidirectional=True, norm_type="dyt"),
    ),
]


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: c[0])
def test_every_head_trains_a_step_and_round_trips(case, tmp_path):
    _, head, auto, make_config = case
    model = head(make_config())
    inputs = image_batch() if head is MlpMixerForImageClassification else text_batch(head)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) > 0.9 * len(list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.step()
    with torch.no_grad():
        assert model(**inputs).loss < loss

    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is head
    eval_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**eval_inputs).logits, model(**eval_inputs).logits, rtol=0, atol=0)


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_extras.tasks.image_classification import image_classification_collator

    torch.manual_seed(0)
    data = Dataset.from_dict({"pixel_values": torch.randn(4, 3, 16, 16).numpy().tolist(), "labels": [0, 1, 2, 3]})
    start = MlpMixerForImageClassification(image_config())
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = MlpMixerForImageClassification(image_config())
        model.load_state_dict(start.state_dict())
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", weight_decay=0.0, report_to="none", use_cpu=True, save_strategy="no",
            logging_strategy="no", seed=0,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data, data_collator=image_classification_collator).train()
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------------------------
# text mode: causality, padding, fixed window, generation
# ------------------------------------------------------------------------------------------------------------------


def test_causal_lm_changing_a_future_token_changes_nothing_before_it():
    model = MlpMixerForCausalLM(text_config()).eval()
    ids = random_ids(2, WINDOW)
    with torch.no_grad():
        reference = model(ids).logits
        for t in (0, 5, WINDOW - 1):
            changed = ids.clone()
            changed[:, t:] = random_ids(2, WINDOW - t)
            logits = model(changed).logits
            assert torch.equal(logits[:, :t], reference[:, :t])
            assert not torch.allclose(logits[:, t:], reference[:, t:])
        # a prefix gives the same logits as the full window
        torch.testing.assert_close(model(ids[:, :7]).logits, reference[:, :7])


@pytest.mark.parametrize("tokens_mlp_dim", [5, 16, 40])  # fewer, as many and more hidden units than positions
def test_causal_token_mixing_has_no_path_from_the_future(tokens_mlp_dim):
    """Jacobian check: d output_t / d input_s is exactly zero for s > t, through every block; with at least one
    hidden unit per position it is non-zero for every s <= t (fewer units cannot connect every pair)."""
    model = MlpMixerModel(text_config(tokens_mlp_dim=tokens_mlp_dim)).eval()
    embeds = torch.randn(1, WINDOW, 32, requires_grad=True)
    out = model(inputs_embeds=embeds).last_hidden_state
    probe = torch.randn(32)  # not a plain sum: the final LayerNorm's outputs always sum to the bias
    for t in range(WINDOW):
        (grad,) = torch.autograd.grad((out[0, t] * probe).sum(), embeds, retain_graph=True)
        influence = grad[0].abs().sum(-1)
        assert torch.all(influence[t + 1 :] == 0), (t, influence)
        assert influence[t] > 0 and influence[0] > 0, (t, influence)
        if tokens_mlp_dim >= WINDOW:
            assert torch.all(influence[: t + 1] > 0), (t, influence)


def test_causal_degrees_cover_every_position_and_stagger_across_blocks():
    from hf_extras.models.modeling_mlp_mixer import causal_degrees, causal_token_masks

    for units in (16, 24, 40, 384):
        for block in range(3):
            degrees = causal_degrees(units, 16, block, 3)
            assert degrees.min() == 0 and degrees.max() == 15 and set(degrees.tolist()) == set(range(16))
            assert torch.all(degrees[1:] >= degrees[:-1])
    for units, window, blocks in ((5, 16, 2), (24, 16, 3), (7, 13, 4), (64, 64, 1), (3, 50, 5)):
        for block in range(blocks):
            degrees = causal_degrees(units, window, block, blocks)
            for length in range(1, window + 1):
                mask1, mask2, used = causal_token_masks(units, window, length, block=block, num_blocks=blocks)
                assert used == int((degrees < length).sum()), (units, window, block, length)
                assert mask1.shape == (used, length) and mask2.shape == (length, used)
    few = [set(causal_degrees(5, 16, block, 2).tolist()) for block in range(2)]
    assert few[0] != few[1] and all(max(d) < 16 for d in few)


def test_bidirectional_text_mixer_sees_both_ways():
    model = MlpMixerModel(text_config(bidirectional=True)).eval()
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1 - 3) % (VOCAB - 3) + 3
    with torch.no_grad():
        assert not torch.allclose(model(ids).last_hidden_state[0, 0], model(changed).last_hidden_state[0, 0])


def _pad(ids, real, side, pad_id=0, total=12):
    """Rows of `ids[:, :real]` padded to `total` on `side`, with random (not pad) ids in the padded positions."""
    batch = ids.shape[0]
    filler = torch.randint(3, VOCAB, (batch, total - real))
    mask = torch.cat([torch.ones(batch, real, dtype=torch.long), torch.zeros(batch, total - real, dtype=torch.long)], 1)
    padded = torch.cat([ids[:, :real], filler], 1)
    if side == "left":
        padded, mask = padded.roll(total - real, 1), mask.roll(total - real, 1)
    return padded, mask


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("head", [MlpMixerForSequenceClassification, MlpMixerForTokenClassification])
def test_padded_tokens_never_influence_real_ones(head, bidirectional):
    model = head(text_config(bidirectional=bidirectional)).eval()
    ids = random_ids(2, 12)
    real = 8
    with torch.no_grad():
        unpadded = model(ids[:, :real]).logits
        for side in ("right", "left"):
            padded, mask = _pad(ids, real, side)
            logits = model(padded, attention_mask=mask).logits
            other, _ = _pad(ids, real, side)  # different random ids in the padded positions
            assert not torch.equal(other, padded)
            logits_other = model(other, attention_mask=mask).logits
            if head is MlpMixerForTokenClassification:
                keep = mask.bool()
                torch.testing.assert_close(logits[keep], logits_other[keep], rtol=0, atol=0)
                torch.testing.assert_close(logits[keep].view(2, real, -1), unpadded, rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(logits, logits_other, rtol=0, atol=0)
                torch.testing.assert_close(logits, unpadded, rtol=1e-5, atol=1e-5)


def test_causal_lm_left_padding_matches_unpadded():
    model = MlpMixerForCausalLM(text_config()).eval()
    ids = random_ids(1, 9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits[:, 4:], model(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_inputs_longer_than_the_window_raise_a_clear_error():
    model = MlpMixerForCausalLM(text_config()).eval()
    with pytest.raises(ValueError, match=f"max_position_embeddings={WINDOW}"):
        model(random_ids(1, WINDOW + 1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(random_ids(1, WINDOW - 2), max_new_tokens=5, do_sample=False, pad_token_id=0)


def test_generation_recomputes_the_window_and_matches_a_manual_loop():
    model = MlpMixerForCausalLM(text_config()).eval()
    prompt = random_ids(2, 5)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        sequence = prompt
        for _ in range(6):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
        with_cache_flag = model.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True
        )
    assert torch.equal(generated, sequence)
    assert torch.equal(with_cache_flag, sequence)


def test_left_padded_batched_generation_matches_single():
    model = MlpMixerForCausalLM(text_config()).eval()
    short, long = random_ids(1, 3), random_ids(1, 6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long], 0)
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 3)], 1), torch.ones(1, 6)], 0).long()
    with torch.no_grad():
        together = model.generate(
            batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        alone = model.generate(short, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(together[0, 3:], alone[0])


# ------------------------------------------------------------------------------------------------------------------
# image processor and pipeline
# ------------------------------------------------------------------------------------------------------------------


def _rgb_image(height=20, width=28, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_image_processor_resizes_rescales_normalizes_channels_first():
    from PIL import Image

    processor = MlpMixerImageProcessor(size={"height": 16, "width": 16})
    image = _rgb_image()
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 16) and pixel_values.dtype == torch.float32
    expected = np.asarray(image.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = torch.from_numpy((expected - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(pixel_values[0], expected, rtol=0, atol=1e-5)
    assert -1.0 - 1e-6 <= pixel_values.min() and pixel_values.max() <= 1.0 + 1e-6
    # numpy (H, W, C) uint8 input gives the same numbers; a batch gives a batch
    torch.testing.assert_close(processor(np.asarray(image), return_tensors="pt")["pixel_values"], pixel_values)
    assert processor([image, _rgb_image(seed=1)], return_tensors="pt")["pixel_values"].shape == (2, 3, 16, 16)


def test_grayscale_processor_converts_colour_inputs():
    processor = MlpMixerImageProcessor.from_model_config(image_config(num_channels=1, image_size=8, patch_size=2))
    assert processor.image_mean == (0.5,) and processor.size.height == 8
    image = _rgb_image()
    out = processor(image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out, processor(image.convert("L"), return_tensors="pt")["pixel_values"])
    rgb = MlpMixerImageProcessor(size={"height": 8, "width": 8})
    assert rgb(image.convert("L"), return_tensors="pt")["pixel_values"].shape == (1, 3, 8, 8)


def test_image_processor_save_load_round_trip(tmp_path):
    processor = MlpMixerImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MlpMixerImageProcessor"
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is MlpMixerImageProcessor
    assert reloaded.to_dict() == processor.to_dict()
    image = _rgb_image()
    torch.testing.assert_close(
        reloaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


def test_image_classification_pipeline_on_pil_images(tmp_path):
    config = image_config()
    model = MlpMixerForImageClassification(config).eval()
    processor = MlpMixerImageProcessor.from_model_config(config)
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
    images = [_rgb_image(seed=s) for s in range(3)]
    results = classify(images, top_k=2)
    assert len(results) == 3 and all(len(r) == 2 for r in results)
    assert {r["label"] for rs in results for r in rs} <= set(config.id2label.values())
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert [rs[0]["label"] for rs in results] == [config.id2label[i] for i in logits.argmax(-1).tolist()]

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from_folder = transformers.pipeline("image-classification", model=str(tmp_path))
    assert from_folder(images[0], top_k=1)[0]["label"] == results[0][0]["label"]


def test_remote_code_load_without_hf_extras(tmp_path):
    image_model = MlpMixerForImageClassification(image_config()).eval()
    processor = MlpMixerImageProcessor.from_model_config(image_model.config)
    image_model.save_pretrained(tmp_path / "image")
    processor.save_pretrained(tmp_path / "image")
    auto_map = json.loads((tmp_path / "image" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_mlp_mixer.MlpMixerForImageClassification"
    lm = MlpMixerForCausalLM(text_config()).eval()
    lm.save_pretrained(tmp_path / "lm")
    image = _rgb_image()
    ids = random_ids(1, 6)
    with torch.no_grad():
        expected = {
            "pixel_values": processor(image, return_tensors="pt")["pixel_values"],
            "image_logits": image_model(**processor(image, return_tensors="pt")).logits,
            "ids": ids,
            "lm_logits": lm(ids).logits,
            "generated": lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None),
        }
    torch.save(expected, tmp_path / "expected.pt")
    image.save(tmp_path / "image.png")

    result = run_without_hf_extras(
        f"""
        import torch, transformers
        from PIL import Image
        try:
            import hf_extras
            raise SystemExit("hf_extras must not be importable here")
        except ImportError:
            pass
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification
        ref = torch.load("{tmp_path}/expected.pt")
        image = Image.open("{tmp_path}/image.png")
        processor = AutoImageProcessor.from_pretrained("{tmp_path}/image", trust_remote_code=True)
        model = AutoModelForImageClassification.from_pretrained("{tmp_path}/image", trust_remote_code=True).eval()
        assert "hf_extras" not in type(model).__module__, type(model).__module__
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, ref["pixel_values"], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=pixel_values).logits, ref["image_logits"], rtol=0, atol=1e-6)
        classify = transformers.pipeline("image-classification", model="{tmp_path}/image", trust_remote_code=True)
        assert classify(image, top_k=1)[0]["label"].startswith("class_")
        lm = AutoModelForCausalLM.from_pretrained("{tmp_path}/lm", trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(lm(ref["ids"]).logits, ref["lm_logits"], rtol=0, atol=0)
            out = lm.generate(ref["ids"], max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref["generated"])
        print("REMOTE_OK")
        """,
        cwd=str(tmp_path),
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------------------------
# timm conversion
# ------------------------------------------------------------------------------------------------------------------


def timm_mixer_b16_state_dict(num_classes=1000, device="meta"):
    """timm's `mixer_b16_224` state dict, written out key by key (shapes from timm's MlpMixer), on `device`."""
    shapes = {"stem.proj.weight": (768, 3, 16, 16), "stem.proj.bias": (768,)}
    for i in range(12):
        shapes.update(
            {
                f"blocks.{i}.norm1.weight": (768,),
                f"blocks.{i}.norm1.bias": (768,),
                f"blocks.{i}.mlp_tokens.fc1.weight": (384, 196),
                f"blocks.{i}.mlp_tokens.fc1.bias": (384,),
                f"blocks.{i}.mlp_tokens.fc2.weight": (196, 384),
                f"blocks.{i}.mlp_tokens.fc2.bias": (196,),
                f"blocks.{i}.norm2.weight": (768,),
                f"blocks.{i}.norm2.bias": (768,),
                f"blocks.{i}.mlp_channels.fc1.weight": (3072, 768),
                f"blocks.{i}.mlp_channels.fc1.bias": (3072,),
                f"blocks.{i}.mlp_channels.fc2.weight": (768, 3072),
                f"blocks.{i}.mlp_channels.fc2.bias": (768,),
            }
        )
    shapes.update(
        {"norm.weight": (768,), "norm.bias": (768,), "head.weight": (num_classes, 768), "head.bias": (num_classes,)}
    )
    return {k: torch.empty(s, device=device) for k, s in shapes.items()}


def test_timm_b16_key_mapping_and_shapes():
    state_dict = timm_mixer_b16_state_dict()
    config = mlp_mixer_config_from_timm(state_dict)
    preset = MlpMixerConfig.from_preset("B/16", num_labels=1000)
    fields = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "tokens_mlp_dim")
    for field in fields + ("channels_mlp_dim", "num_labels"):
        assert getattr(config, field) == getattr(preset, field), field
    converted = convert_timm_mixer_state_dict(state_dict, config)
    with torch.device("meta"):
        model = MlpMixerForImageClassification(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert len(converted) == 12 * 12 + 6
    assert timm_mixer_key_to_hf("blocks.3.mlp_tokens.fc1.weight") == "model.blocks.3.mlp_tokens.fc1.weight"
    assert timm_mixer_key_to_hf("stem.proj.weight") == "model.stem.proj.weight"
    assert timm_mixer_key_to_hf("head.bias") == "head.bias"
    assert timm_mixer_key_to_hf("norm.weight") == "model.norm.weight"


def test_converter_names_bad_keys_and_shapes():
    state_dict = timm_mixer_b16_state_dict()
    config = mlp_mixer_config_from_timm(state_dict)
    with pytest.raises(ValueError, match="blocks.0.mlp_tokens.fc2.weight"):
        wrong = torch.empty(10, 384, device="meta")
        convert_timm_mixer_state_dict({**state_dict, "blocks.0.mlp_tokens.fc2.weight": wrong}, config)
    with pytest.raises(ValueError, match="unexpected keys.*pos_embed"):
        convert_timm_mixer_state_dict({**state_dict, "pos_embed": torch.empty(1, device="meta")}, config)
    missing = dict(state_dict)
    del missing["blocks.11.norm2.bias"]
    with pytest.raises(ValueError, match="missing keys.*blocks.11.norm2.bias"):
        convert_timm_mixer_state_dict(missing, config)
    with pytest.raises(ValueError, match="not a parameter of timm"):
        timm_mixer_key_to_hf("blocks.0.attn.qkv.weight")


class RefMlp(nn.Module):
    """timm.layers.Mlp as used by MixerBlock: fc1 -> GELU -> (dropout) -> (Identity norm) -> fc2 -> (dropout)."""

    def __init__(self, features, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefMixerBlock(nn.Module):
    def __init__(self, dim, seq_len, tokens_dim, channels_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = RefMlp(seq_len, tokens_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = RefMlp(dim, channels_dim)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefMlpMixer(nn.Module):
    """An independent copy of timm's MlpMixer forward: stem -> blocks -> norm -> mean over tokens -> head."""

    def __init__(
        self, num_classes=7, img_size=32, in_chans=3, patch_size=8, num_blocks=2, embed_dim=32, mlp_ratio=(0.5, 4.0)
    ):
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * embed_dim), int(mlp_ratio[1] * embed_dim)
        self.stem = RefPatchEmbed(in_chans, embed_dim, patch_size)
        seq_len = (img_size // patch_size) ** 2
        self.blocks = nn.Sequential(
            *[RefMixerBlock(embed_dim, seq_len, tokens_dim, channels_dim) for _ in range(num_blocks)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=1))


def _randomise(module):
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.2)
    return module.eval()


def test_converted_weights_give_identical_logits_to_a_timm_style_reference():
    reference = _randomise(RefMlpMixer())
    model = load_timm_mixer(reference.state_dict())
    assert (model.config.image_size, model.config.patch_size, model.config.num_labels) == (32, 8, 7)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixels), rtol=0, atol=1e-6)


def timm_eval_transform(image, img_size, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """timm's evaluation transform (`transforms_imagenet_eval`, crop_mode "center"), written out with PIL and torch:
    torchvision's `Resize(floor(img_size / crop_pct), BICUBIC)` on the short side, `CenterCrop(img_size)` (offsets
    `int(round((size - crop) / 2))`), `ToTensor()`, `Normalize(mean, std)`."""
    import math

    from PIL import Image

    scale = math.floor(img_size / crop_pct)
    width, height = image.size
    if width <= height:
        new_width, new_height = scale, int(scale * height / width)
    else:
        new_width, new_height = int(scale * width / height), scale
    image = image.resize((new_width, new_height), Image.BICUBIC)
    top, left = int(round((new_height - img_size) / 2.0)), int(round((new_width - img_size) / 2.0))
    image = image.crop((left, top, left + img_size, top + img_size))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@pytest.mark.parametrize("size", [(20, 26), (26, 20), (37, 23)])  # (width, height): odd crop margins, both ways
def test_timm_processor_equals_timm_eval_transform(size):
    """The converter's processor reproduces timm's eval transform (resize short side to img/crop_pct, centre crop)."""
    image = _rgb_image(height=size[1], width=size[0], seed=sum(size))
    processor = timm_mixer_image_processor({"input_size": (3, 16, 16)})
    ours = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, timm_eval_transform(image, 16), rtol=0, atol=1e-6)
    # resizing straight to the model size (the processor a config alone gives) is not what timm's weights saw
    plain = MlpMixerImageProcessor(size={"height": 16, "width": 16})(image, return_tensors="pt")["pixel_values"][0]
    assert (plain - ours).abs().max() > 0.05


def test_timm_processor_follows_the_data_config():
    image = _rgb_image(height=40, width=50, seed=3)
    data_config = {"input_size": (3, 32, 32), "crop_pct": 0.9, "mean": (0.485, 0.456, 0.406), "std": (0.2, 0.3, 0.4)}
    ours = timm_mixer_image_processor(data_config)(image, return_tensors="pt")["pixel_values"][0]
    expected = timm_eval_transform(image, 32, crop_pct=0.9, mean=data_config["mean"], std=data_config["std"])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="crop_mode"):
        timm_mixer_image_processor({"crop_mode": "border"})
    with pytest.raises(ValueError, match="interpolation"):
        timm_mixer_image_processor({"interpolation": "cubic-ish"})


def test_import_timm_mixer_saves_a_processor_with_timm_logits(tmp_path):
    """Converted weights + saved processor give the logits of timm's model on timm's preprocessing."""
    reference = _randomise(RefMlpMixer())  # 32 px, patch 8
    model, processor = import_timm_mixer(reference.state_dict(), {"input_size": (3, 32, 32)}, tmp_path)
    image = _rgb_image(height=45, width=61, seed=7)
    with torch.no_grad():
        expected = reference(timm_eval_transform(image, 32)[None])
        reloaded = AutoImageProcessor.from_pretrained(tmp_path)
        assert type(reloaded) is MlpMixerImageProcessor and reloaded.to_dict() == processor.to_dict()
        logits = MlpMixerForImageClassification.from_pretrained(tmp_path)(**reloaded(image, return_tensors="pt"))
    torch.testing.assert_close(logits.logits, expected, rtol=0, atol=1e-5)
    assert model.config.image_size == 32
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        import_timm_mixer(reference.state_dict(), {"input_size": (3, 224, 224)})


def _import_timm():
    try:
        import timm  # timm imports torchvision, which fails beside some CPU torch builds
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"timm is not importable here: {type(error).__name__}: {error}")
    return timm


def test_converted_weights_give_identical_logits_to_timm():
    timm = _import_timm()
    reference = timm.models.mlp_mixer.MlpMixer(num_classes=7, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)
    _randomise(reference)
    model = load_timm_mixer(reference.state_dict())
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, reference(pixels), rtol=0, atol=1e-6)
    b16 = timm.create_model("mixer_b16_224", pretrained=False)
    assert {k: tuple(v.shape) for k, v in b16.state_dict().items()} == {
        k: tuple(v.shape) for k, v in timm_mixer_b16_state_dict().items()
    }


# ------------------------------------------------------------------------------------------------------------------
# digits task and the CLI
# ------------------------------------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_seeded():
    from hf_extras.tasks.image_classification import load_digits_splits

    splits = load_digits_splits(0.2, seed=0)
    assert (len(splits["train"]), len(splits["validation"])) == (1437, 360)
    counts = np.bincount(splits["validation"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of each class (174..183 per class)
    again = load_digits_splits(0.2, seed=0)
    assert again["validation"]["label"] == splits["validation"]["label"]
    assert load_digits_splits(0.2, seed=1)["validation"]["pixels"] != splits["validation"]["pixels"]


def test_digits_pixel_values_match_the_image_processor():
    from hf_extras.tasks.image_classification import (
        digits_to_pil,
        digits_to_pixel_values,
        image_classification_collator,
        load_digits_splits,
        prepare_image_classification_dataset,
    )

    raw = load_digits_splits(0.2, seed=0)
    processor = MlpMixerImageProcessor(size={"height": 8, "width": 8}, num_channels=1)
    pixels = raw["validation"]["pixels"][:4]
    via_processor = processor([digits_to_pil(p) for p in pixels], return_tensors="pt")["pixel_values"]
    direct = torch.from_numpy(digits_to_pixel_values(pixels))
    assert direct.shape == via_processor.shape == (4, 1, 8, 8)
    torch.testing.assert_close(via_processor, direct, rtol=0, atol=1.0 / 255 + 1e-6)  # 8-bit rounding only
    prepared = prepare_image_classification_dataset(raw)
    batch = image_classification_collator([prepared["train"][i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == raw["train"]["label"][:5]


def test_mixer_digits_config_parses():
    from hf_extras.cli import parse_train_args

    args = parse_train_args(f"{REPO}/configs/mixer_digits.yaml")
    assert args.data.task == "image_classification" and args.model_type == "hfx_mlp_mixer"
    assert args.model_overrides["patch_size"] == 2 and args.data.validation_fraction == 0.2


def test_cli_image_classification_run_writes_a_pipeline_ready_folder(tmp_path):
    from hf_extras.cli import main
    from hf_extras.tasks.image_classification import digits_to_pil, load_digits_splits

    out = tmp_path / "run"
    status = main(
        ["train", f"{REPO}/configs/mixer_digits.yaml", "--max_steps=3", "--eval_strategy=no", "--sample_images=2",
         f"--output_dir={out}", "--hidden_size=16", "--num_hidden_layers=1", "--channels_mlp_dim=32"]
    )  # fmt: skip
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "image_classification" and 0.0 <= metrics["final_eval_accuracy"] <= 1.0
    assert (out / "preprocessor_config.json").exists()
    classify = transformers.pipeline("image-classification", model=str(out))
    digit = load_digits_splits(0.2, seed=0)["validation"]["pixels"][0]
    assert classify(digits_to_pil(digit), top_k=1)[0]["label"] in [str(i) for i in range(10)]
