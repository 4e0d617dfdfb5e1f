"""Bottleneck adapters: identity at initialisation, Houlsby/Pfeiffer placement, named adapters switching, training
only the adapter (+ head, norms), saving and loading only the adapter weights."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, HEADS, head_config
from safetensors.torch import load_file

import hf_extras
from hf_extras.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BottleneckAdapter,
    BottleneckConfig,
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    save_adapter,
    set_active_adapter,
    train_adapter,
)
from hf_extras.models.backbone import SequenceBlock

HEAD = "ForSequenceClassification"


def tiny(family, **overrides):
    return family.cls(HEAD)(head_config(family, HEAD, **overrides)).eval()


def mixer_image_model():
    config = hf_extras.MlpMixerConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, tokens_mlp_dim=24, channels_mlp_dim=64,
        num_labels=5,
    )  # fmt: skip
    return hf_extras.MlpMixerForImageClassification(config).eval()


def logits(model, ids=None, pixels=None):
    with torch.no_grad():
        return model(pixel_values=pixels).logits if pixels is not None else model(input_ids=ids).logits


def randomize_up(model, name: str, scale: float = 0.5) -> None:
    """Give adapter `name` non-zero up-projections (as after training)."""
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"bottleneck_adapters.{name}." in param_name and ".up." in param_name:
                param.normal_(0.0, scale)


IDS = torch.randint(5, 90, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_zero_init_leaves_outputs_identical_and_training_changes_them(family, placement):
    model = tiny(family, initializer_range=0.3)
    base = logits(model, IDS)
    add_adapter(model, "task", BottleneckConfig(bottleneck_size=4, placement=placement))
    assert torch.equal(logits(model, IDS), base)
    randomize_up(model, "task")
    assert not torch.allclose(logits(model, IDS), base, atol=1e-5)


def test_zero_init_on_mlp_mixer_images():
    model = mixer_image_model()
    pixels = torch.randn(2, 3, 16, 16)
    base = logits(model, pixels=pixels)
    add_adapter(model, "task", BottleneckConfig(bottleneck_size=4, placement="houlsby"))
    assert torch.equal(logits(model, pixels=pixels), base)
    randomize_up(model, "task")
    assert not torch.allclose(logits(model, pixels=pixels), base, atol=1e-5)


def adapter_slots(model) -> set[str]:
    return {n.split(".bottleneck_adapters.")[1].split(".")[1] for n, _ in model.named_parameters() if "bottleneck" in n}


@pytest.mark.parametrize(
    ("family_name", "placement", "slots"),
    [
        ("retnet", "houlsby", {"mixer", "ffn"}),
        ("retnet", "pfeiffer", {"ffn"}),
        ("dyt", "pfeiffer", {"ffn"}),
        ("mamba", "houlsby", {"mixer"}),  # Mamba blocks have no FFN by default: the mixer is the last sub-layer
        ("mamba", "pfeiffer", {"mixer"}),
    ],
)
def test_placement_adapts_the_stated_sublayer_outputs(family_name, placement, slots):
    family = next(f for f in FAMILIES if f.name == family_name)
    model = tiny(family, initializer_range=0.3)
    blocks = [m for m in model.modules() if isinstance(m, SequenceBlock)]
    raw, seen = {}, {}
    for i, block in enumerate(blocks):  # registered first: sees the sub-layer's own output
        for slot in ("mixer", "ffn"):
            module = getattr(block, slot)
            if module is not None:
                module.register_forward_hook(
                    lambda m, a, out, key=(i, slot): raw.__setitem__(key, out[0] if isinstance(out, tuple) else out)
                )
    add_adapter(model, "task", BottleneckConfig(bottleneck_size=4, placement=placement))
    assert adapter_slots(model) == slots
    randomize_up(model, "task")
    for i, block in enumerate(blocks):
        for slot, adapter in block.bottleneck_adapters["task"].items():
            adapter.register_forward_hook(lambda m, a, out, key=(i, slot): seen.__setitem__(key, (a[0], out)))
    logits(model, IDS)
    assert set(seen) == {(i, s) for i in range(len(blocks)) for s in slots}
    for key, (adapter_input, adapter_output) in seen.items():
        assert torch.equal(adapter_input, raw[key])  # the adapter reads exactly the sub-layer's output
        assert not torch.allclose(adapter_output, adapter_input)


def test_mixer_houlsby_adapts_token_mixing_over_channels():
    model = mixer_image_model()
    add_adapter(model, "task", BottleneckConfig(bottleneck_size=4, placement="houlsby"))
    block = model.model.blocks[0]
    assert set(block.bottleneck_adapters["task"]) == {"mixer", "ffn"}
    assert block.bottleneck_adapters["task"]["mixer"].down.in_features == model.config.hidden_size
    add_adapter(model, "small", BottleneckConfig(bottleneck_size=4, placement="pfeiffer"))
    assert set(block.bottleneck_adapters["small"]) == {"ffn"}


def test_two_named_adapters_switch_on_one_base():
    model = tiny(FAMILIES[0], initializer_range=0.3)
    base = logits(model, IDS)
    add_adapter(model, "a", BottleneckConfig(bottleneck_size=4))
    randomize_up(model, "a")
    out_a = logits(model, IDS)
    add_adapter(model, "b", BottleneckConfig(bottleneck_size=8, placement="pfeiffer"))  # add activates it
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "b"
    randomize_up(model, "b")
    out_b = logits(model, IDS)
    assert not torch.allclose(out_a, out_b, atol=1e-5)
    set_active_adapter(model, "a")
    assert torch.equal(logits(model, IDS), out_a)
    set_active_adapter(model, None)
    assert torch.equal(logits(model, IDS), base)
    with pytest.raises(KeyError, match="'c'"):
        set_active_adapter(model, "c")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        add_adapter(model, "a")
    delete_adapter(model, "b")
    delete_adapter(model, "a")
    assert list_adapters(model) == [] and not hasattr(model.model.layers[0], "bottleneck_adapters")
    assert torch.equal(logits(model, IDS), base)


@pytest.mark.parametrize("train_norms", [False, True])
def test_train_adapter_freezes_everything_else(train_norms):
    model = tiny(FAMILIES[0])
    add_adapter(model, "a", BottleneckConfig(bottleneck_size=4))
    add_adapter(model, "b", BottleneckConfig(bottleneck_size=4))
    train_adapter(model, "a", train_head=True, train_norms=train_norms)
    assert active_adapter(model) == "a"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".bottleneck_adapters.a." in n for n in trainable)
    assert not any(".bottleneck_adapters.b." in n for n in trainable)
    assert "score.weight" in trainable
    norms = {n for n in trainable if "norm" in n}
    assert bool(norms) == train_norms
    others = trainable - norms - {"score.weight"}
    assert all(".bottleneck_adapters.a." in n for n in others)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="middle")
    with pytest.raises(ValueError, match="activation"):
        BottleneckConfig(activation="nope")
    with pytest.raises(ValueError, match="unknown BottleneckConfig keys"):
        BottleneckConfig.from_dict({"bottleneck_size": 4, "reduction_factor": 16})


def test_without_residual_the_adapter_replaces_the_sublayer_output():
    adapter = BottleneckAdapter(8, BottleneckConfig(bottleneck_size=2, residual=False))
    assert torch.equal(adapter(torch.randn(3, 8)), torch.zeros(3, 8))  # zero up: the sub-layer is silenced


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[4], FAMILIES[5]], ids=lambda f: f.name)
def test_save_and_load_only_the_adapter_and_head(family, tmp_path):
    model = tiny(family, initializer_range=0.3)
    model.save_pretrained(tmp_path / "base")
    add_adapter(model, "sentiment", BottleneckConfig(bottleneck_size=4))
    randomize_up(model, "sentiment")
    with torch.no_grad():
        model.score.weight.add_(0.5)  # a trained head: it must come from the adapter file
    expected = logits(model, IDS)
    save_adapter(model, tmp_path / "adapter")

    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert set(tensors) == {n for n, _ in model.named_parameters() if "bottleneck_adapters" in n} | {"score.weight"}
    info = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert info["adapter_name"] == "sentiment" and info["bottleneck_config"]["bottleneck_size"] == 4

    base = HEADS[HEAD].from_pretrained(tmp_path / "base").eval()
    assert load_adapter(base, tmp_path / "adapter") == "sentiment"
    assert torch.equal(logits(base, IDS), expected)
    # the same weights under another name, beside the first
    assert load_adapter(base, tmp_path / "adapter", name="copy") == "copy"
    assert active_adapter(base) == "copy" and torch.equal(logits(base, IDS), expected)


def test_load_refuses_mismatches(tmp_path):
    model = tiny(FAMILIES[0])
    add_adapter(model, "a", BottleneckConfig(bottleneck_size=4))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="hidden_size=32.*64"):
        load_adapter(tiny(FAMILIES[0], hidden_size=64), tmp_path / "adapter")
    with pytest.raises(ValueError, match="model_type='hfx_retnet'"):
        load_adapter(tiny(FAMILIES[4]), tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        load_adapter(model, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG_NAME):
        load_adapter(model, tmp_path)
    token_model = FAMILIES[0].cls("ForTokenClassification")(head_config(FAMILIES[0], "ForTokenClassification"))
    with pytest.raises(ValueError, match=r"missing keys \['score.bias'\]"):  # another head: it has a bias
        load_adapter(token_model, tmp_path / "adapter")
    assert list_adapters(token_model) == []  # nothing half-loaded stays behind
    with pytest.raises(ValueError, match=r"shape mismatches \['score.weight'\]"):
        load_adapter(FAMILIES[0].cls(HEAD)(FAMILIES[0].config(num_labels=5)), tmp_path / "adapter")
