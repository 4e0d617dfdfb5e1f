"""Bad input fails early with a message that names the field and the fix."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from huggingface_hub.errors import StrictDataclassError


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(forward_mode="fast"), "forward_mode"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-4), "chunk_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(ffn_type="moe", num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_invalid_config_raises_at_construction(family, overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        family.config(**overrides)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_out_of_vocabulary_ids_raise_before_kernels(family):
    model = family.cls("ForCausalLM")(family.config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, 96]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 5]]))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_wrong_attention_mask_shape_raises(family):
    model = family.cls("ForCausalLM")(family.config())
    ids = torch.randint(7, 96, (2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(3, 6))
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6))


# ------------------------------------------------------------------------------------------------------------------
# every bad tensor input fails at the top of the forward with one error naming the argument (issue 16)
# ------------------------------------------------------------------------------------------------------------------

IDS = torch.randint(7, 96, (2, 6))
BAD_FORWARDS = {
    "mask value 2": (dict(attention_mask=torch.full((2, 6), 2)), ValueError, "attention_mask.*only 1.*and 0"),
    "mask value 0.5": (dict(attention_mask=torch.full((2, 6), 0.5)), ValueError, "attention_mask.*only 1.*and 0"),
    "mask value -1": (dict(attention_mask=-torch.ones(2, 6, dtype=torch.long)), ValueError, "attention_mask"),
    "position_ids too short": (dict(position_ids=torch.arange(5)[None]), ValueError, r"position_ids.*\(2, 6\)"),
    "position_ids 3-D": (dict(position_ids=torch.arange(6)[None, None]), ValueError, "position_ids"),
    "position_ids batch": (dict(position_ids=torch.arange(6)[None].expand(3, -1)), ValueError, "position_ids"),
    "position_ids float": (dict(position_ids=torch.arange(6.0)[None]), TypeError, "position_ids.*integers"),
    "float input_ids": (dict(input_ids=IDS.float()), TypeError, r"input_ids.*integer token ids.*\.long\(\)"),
    "1-D input_ids": (dict(input_ids=IDS[0]), ValueError, r"input_ids.*\(batch, seq_len\)"),
    "empty sequence": (dict(input_ids=IDS[:, :0]), ValueError, r"input_ids.*empty.*\(2, 0\)"),
    "empty batch": (dict(input_ids=IDS[:0]), ValueError, r"input_ids.*empty.*\(0, 6\)"),
    "embeds width": (dict(input_ids=None, inputs_embeds=torch.randn(2, 6, 31)), ValueError, "inputs_embeds.*=32"),
    "embeds 2-D": (dict(input_ids=None, inputs_embeds=torch.randn(6, 32)), ValueError, "inputs_embeds"),
    "embeds empty": (dict(input_ids=None, inputs_embeds=torch.randn(2, 0, 32)), ValueError, "inputs_embeds.*empty"),
    "integer embeds": (dict(input_ids=None, inputs_embeds=IDS[..., None].expand(-1, -1, 32)), TypeError, "embeds"),
}


def _no_kernel(monkeypatch, family):
    """Make every token mixer of the family raise if reached: the checks must come first."""
    model_class = family.cls("Model")

    def reached(*args, **kwargs):
        raise AssertionError("a token mixer ran before the input was checked")

    monkeypatch.setattr(model_class.mixer_class, "forward", reached)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", list(BAD_FORWARDS), ids=str)
def test_bad_tensor_inputs_raise_before_any_mixer(family, case, monkeypatch):
    kwargs, error, match = BAD_FORWARDS[case]
    kwargs = {"input_ids": IDS, **kwargs}
    model = family.cls("ForCausalLM")(family.config())
    _no_kernel(monkeypatch, family)
    with pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_labels_of_the_wrong_shape_raise_before_any_mixer(family, monkeypatch):
    causal = family.cls("ForCausalLM")(family.config())
    encoder = dict(bidirectional=True, num_labels=3)
    heads = {name: family.cls(name)(family.config(**encoder)) for name in ("ForMaskedLM", "ForTokenClassification")}
    classifier = family.cls("ForSequenceClassification")(family.config(num_labels=3))
    qa = family.cls("ForQuestionAnswering")(family.config(bidirectional=True))
    seq2seq = family.cls("ForConditionalGeneration")(family.config())
    _no_kernel(monkeypatch, family)
    for model in (causal, *heads.values()):
        with pytest.raises(ValueError, match=r"`labels` must have the input's shape \(2, 6\).*got \(2, 5\)"):
            model(IDS, labels=IDS[:, :5])
        with pytest.raises(ValueError, match=r"`labels`.*got \(1, 6\)"):
            model(IDS, labels=IDS[:1])
        with pytest.raises(TypeError, match="`labels` must be integer class ids"):
            model(IDS, labels=IDS.float())
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\).*or \(2, 3\).*got \(3,\)"):
        classifier(IDS, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`labels`.*got \(2, 6\)"):
        classifier(IDS, labels=IDS)
    with pytest.raises(ValueError, match=r"`start_positions`.*\(2,\)"):
        qa(IDS, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"`end_positions`.*\(2,\)"):
        qa(IDS, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match=r"`labels` must have the decoder inputs' shape \(2, 4\)"):
        seq2seq(IDS, decoder_input_ids=IDS[:, :4], labels=IDS[:, :3])
    with pytest.raises(ValueError, match=r"`labels`.*\(2, 5\).*got \(5,\)"):
        seq2seq(IDS, labels=IDS[0, :5])
    with pytest.raises(ValueError, match=r"`labels`.*got \(1, 5\)"):
        seq2seq(IDS, labels=IDS[:1, :5])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_seq2seq_checks_both_stacks_inputs(family, monkeypatch):
    model = family.cls("ForConditionalGeneration")(family.config())
    _no_kernel(monkeypatch, family)
    with pytest.raises(ValueError, match="attention_mask.*only 1"):
        model(IDS, attention_mask=torch.full((2, 6), 3), decoder_input_ids=IDS[:, :2])
    with pytest.raises(TypeError, match="input_ids.*integer"):
        model(IDS, decoder_input_ids=IDS[:, :2].float())
    with pytest.raises(ValueError, match="input_ids.*empty"):
        model(IDS[:, :0], decoder_input_ids=IDS[:, :2])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_act="swishh"), "hidden_act.*'swishh'.*silu"),
        (dict(pad_token_id=96), r"pad_token_id.*\(96\).*vocab_size=96"),
        (dict(pad_token_id=-1), "pad_token_id"),
    ],
)
def test_bad_activation_and_pad_id_fail_at_config_construction(family, overrides, match):
    with pytest.raises(StrictDataclassError, match=match):
        family.config(**overrides)


def test_mlp_mixer_checks_the_same_inputs():
    from hf_extras import MlpMixerConfig, MlpMixerForCausalLM, MlpMixerForImageClassification

    with pytest.raises(StrictDataclassError, match="hidden_act.*'gelu_fast_typo'"):
        MlpMixerConfig(hidden_act="gelu_fast_typo")
    with pytest.raises(StrictDataclassError, match="pad_token_id"):
        MlpMixerConfig(modality="text", vocab_size=96, pad_token_id=96)
    text = dict(modality="text", vocab_size=96, max_position_embeddings=8, hidden_size=32, num_hidden_layers=1)
    model = MlpMixerForCausalLM(MlpMixerConfig(tokens_mlp_dim=16, channels_mlp_dim=32, **text))
    for case in ("mask value 2", "float input_ids", "empty sequence", "empty batch", "embeds width"):
        kwargs, error, match = BAD_FORWARDS[case]
        with pytest.raises(error, match=match):
            model(**{"input_ids": IDS, **kwargs})
    with pytest.raises(ValueError, match=r"`labels` must have the input's shape \(2, 6\)"):
        model(IDS, labels=IDS[:, :5])
    image = MlpMixerForImageClassification(
        MlpMixerConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_labels=3)
    )
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\)"):
        image(torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1, 2]))


def test_value_checks_never_read_accelerator_tensors():
    """Checks that need values skip non-CPU tensors (no device sync); shape and dtype checks still run."""
    from hf_extras.models.input_checks import check_attention_mask_values, check_token_inputs

    check_attention_mask_values(torch.full((2, 3), 2.0, device="meta"))  # would need a sync: skipped
    with pytest.raises(TypeError, match="input_ids"):
        check_token_inputs(torch.zeros(2, 3, device="meta"), None, 32)
    with pytest.raises(ValueError, match="inputs_embeds"):
        check_token_inputs(None, torch.zeros(2, 3, 31, device="meta"), 32)
