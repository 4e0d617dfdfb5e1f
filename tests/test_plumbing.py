"""transformers 5 plumbing the models use instead of hand-written copies: `return_dict=False` (`can_return_tuple`),
hidden states (`capture_outputs`), embedding accessors (`EmbeddingAccessMixin`), rotary tables computed once per
forward, one channels-last causal conv, the common config base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, HEADS, head_config

import hf_extras
from hf_extras import MlpMixerConfig
from hf_extras.models import backbone as backbone_module
from hf_extras.models.conv_ops import causal_depthwise_conv

ALL_HEADS = [*HEADS, "ForConditionalGeneration"]


def _inputs(head: str, ids: torch.Tensor) -> dict:
    if head == "ForConditionalGeneration":
        return dict(input_ids=ids, decoder_input_ids=ids[:, :3])
    return dict(input_ids=ids)


def _first_field(output) -> torch.Tensor:
    """The first field of a ModelOutput that is set (what `to_tuple()` puts first)."""
    return next(value for value in output.values() if value is not None)


@pytest.mark.parametrize("head", ALL_HEADS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_return_dict_false_returns_a_tuple(family, head):
    torch.manual_seed(0)
    model = family.cls(head)(head_config(family, head)).eval()
    inputs = _inputs(head, torch.randint(7, 96, (2, 6)))
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and not isinstance(as_dict, tuple)
    torch.testing.assert_close(as_tuple[0], _first_field(as_dict))
    assert len(as_tuple) == len(as_dict.to_tuple())


@pytest.mark.parametrize(
    "cls, config",
    [
        ("MlpMixerModel", dict(modality="image")),
        ("MlpMixerForImageClassification", dict(modality="image", num_labels=3)),
        ("MlpMixerForCausalLM", dict(modality="text")),
        ("MlpMixerForSequenceClassification", dict(modality="text", num_labels=3)),
        ("MlpMixerForTokenClassification", dict(modality="text", num_labels=3)),
    ],
)
def test_mlp_mixer_return_dict_false_returns_a_tuple(cls, config):
    config = MlpMixerConfig(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, tokens_mlp_dim=8, channels_mlp_dim=32,
        vocab_size=50, max_position_embeddings=8, **config,
    )  # fmt: skip
    model = getattr(hf_extras, cls)(config).eval()
    inputs = (
        dict(pixel_values=torch.randn(2, 3, 16, 16))
        if config.modality == "image"
        else dict(input_ids=torch.randint(3, 50, (2, 6)))
    )
    with torch.no_grad():
        as_dict, as_tuple = model(**inputs), model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], _first_field(as_dict))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_hidden_states_are_embeddings_then_every_block(family):
    """`capture_outputs` records the first block's input and every block's output, the last one after the norm."""
    torch.manual_seed(0)
    model = family.cls("Model")(family.config()).eval()
    ids = torch.randint(7, 96, (2, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        plain = model(ids)
    assert plain.hidden_states is None
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    embeds = model.finish_embeddings(model.embed_tokens(ids), torch.arange(6).expand(2, -1))
    torch.testing.assert_close(out.hidden_states[0], embeds)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_layer_features_and_hidden_states_through_heads(family):
    torch.manual_seed(0)
    model = family.cls("ForSequenceClassification")(family.config(num_labels=3, use_layer_features=True)).eval()
    ids = torch.randint(7, 96, (2, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        quiet = model(ids)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 and quiet.hidden_states is None
    torch.testing.assert_close(out.logits, quiet.logits)
    # the features are the learned mix of exactly these hidden states
    weights = torch.softmax(model.layer_features.layer_weights, 0)
    mixed = model.layer_features.scale * sum(w * h for w, h in zip(weights, out.hidden_states))
    torch.testing.assert_close(model.layer_features(out.hidden_states), mixed)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_embedding_accessors_are_transformers_own(family):
    lm = family.cls("ForCausalLM")(family.config())
    assert lm.get_input_embeddings() is lm.model.embed_tokens
    assert lm.get_output_embeddings() is lm.lm_head
    seq2seq = family.cls("ForConditionalGeneration")(family.config())
    assert seq2seq.get_input_embeddings() is seq2seq.shared
    assert seq2seq.get_output_embeddings() is seq2seq.lm_head
    new = torch.nn.Embedding(96, 32)
    seq2seq.set_input_embeddings(new)
    assert seq2seq.encoder.embed_tokens is new and seq2seq.decoder.embed_tokens is new


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("retnet", "gated_retnet", "dyt")], ids=str)
def test_rotary_tables_computed_once_per_forward(family, monkeypatch):
    calls = []
    original = backbone_module.rotary_cos_sin

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "rotary_cos_sin", counting)
    model = family.cls("ForCausalLM")(family.config(num_hidden_layers=3)).eval()
    with torch.no_grad():
        model(torch.randint(7, 96, (2, 6)))
    assert len(calls) == 1


def test_rotary_off_computes_no_tables(monkeypatch):
    monkeypatch.setattr(backbone_module, "rotary_cos_sin", lambda *a, **k: pytest.fail("no rotary expected"))
    for family in FAMILIES:
        if family.name in ("mamba", "gla", "linear_attention"):
            family.cls("Model")(family.config())(torch.randint(7, 96, (1, 4)))


@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_channels_last_causal_conv_equals_conv1d(kernel, bias):
    """The one causal conv (every mixer's) gives F.conv1d's numbers, in one pass and streamed with its tail."""
    torch.manual_seed(0)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    weight = torch.randn(6, 1, kernel, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    reference = F.conv1d(F.pad(x.transpose(1, 2), (kernel - 1, 0)), weight, b, groups=6).transpose(1, 2)
    y, tail = causal_depthwise_conv(x, weight, b)
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(tail, x[:, -(kernel - 1) :].transpose(1, 2))
    first, tail = causal_depthwise_conv(x[:, :5], weight, b)
    steps = [first]
    for t in range(5, 11):
        step, tail = causal_depthwise_conv(x[:, t : t + 1], weight, b, tail)
        steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), reference)


def test_dense_ffn_has_no_aux_loss():
    family = FAMILIES[0]
    out = family.cls("Model")(family.config())(torch.randint(7, 96, (1, 4)))
    assert out.aux_loss is None
    moe = family.cls("Model")(family.config(ffn_type="moe", num_experts=4))(torch.randint(7, 96, (1, 4)))
    assert moe.aux_loss is not None and moe.aux_loss.dim() == 0


def test_mlp_mixer_config_is_common_and_old_folders_load(tmp_path):
    config = MlpMixerConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, norm_eps=1e-5)
    assert isinstance(config, hf_extras.models.configuration_common.CommonConfig)
    assert config.norm_eps == 1e-5 and config.layer_norm_eps == 1e-5
    model = hf_extras.MlpMixerForImageClassification(config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["layer_norm_eps"] = saved.pop("norm_eps") * 10  # a folder saved before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = hf_extras.MlpMixerForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.norm_eps == pytest.approx(1e-4)
    assert loaded.model.norm.eps == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "config_class, overrides, field",
    [
        (hf_extras.RetNetConfig, dict(rope_theta=0.0), "rope_theta"),
        (hf_extras.RetNetConfig, dict(norm_eps=-1e-6), "norm_eps"),
        (hf_extras.GatedRetentionConfig, dict(gate_low_rank_dim=0), "gate_low_rank_dim"),
        (hf_extras.GatedRetentionConfig, dict(use_short_conv=True, conv_size=1), "conv_size"),
        (hf_extras.HfxMambaConfig, dict(state_size=0), "state_size"),
        (hf_extras.HfxMambaConfig, dict(time_step_min=0.2, time_step_max=0.1), "time_step_min"),
        (hf_extras.DyTConfig, dict(embedding_scale_init=0.0), "embedding_scale_init"),
        (hf_extras.DyTConfig, dict(num_decoder_layers=0), "num_decoder_layers"),
        (MlpMixerConfig, dict(channels_mlp_dim=0), "channels_mlp_dim"),
        (MlpMixerConfig, dict(initializer_range=-0.1), "initializer_range"),
    ],
)
def test_field_validators_name_the_field(config_class, overrides, field):
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match=field):
        config_class(**overrides)


def test_seq2seq_takes_encoder_outputs_as_a_tuple_with_moe():
    """A tuple from `encoder(..., return_dict=False)` of an MoE model holds the aux loss at position 1: it must not be
    read as the encoder's hidden states (the output equals the one from computing the encoder inside)."""
    family = FAMILIES[0]
    model = family.cls("ForConditionalGeneration")(family.config(ffn_type="moe", num_experts=2, num_experts_per_tok=1))
    model.eval()
    ids = torch.randint(3, 96, (2, 7))
    decoder_ids = torch.randint(3, 96, (2, 5))
    encoder_tuple = model.get_encoder()(ids, return_dict=False)
    assert not isinstance(encoder_tuple[1], tuple)  # the aux loss, not hidden states
    with torch.no_grad():
        expected = model(ids, decoder_input_ids=decoder_ids).logits
        from_tuple = model(encoder_outputs=encoder_tuple, decoder_input_ids=decoder_ids)
        from_dict = model(encoder_outputs=model.get_encoder()(ids), decoder_input_ids=decoder_ids)
    for out in (from_tuple, from_dict):
        torch.testing.assert_close(out.logits, expected)
        assert out.encoder_hidden_states is None  # not the aux loss
