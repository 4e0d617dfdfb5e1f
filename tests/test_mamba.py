"""The Mamba-style family: transformers interop (conversion both ways), forms, padding, cache, init, PEFT.

The generic tests (heads, generation, save/load, remote code, bad input) run on it through `families.FAMILIES`.
"""

from __future__ import annotations

import pytest
import torch
from families import assert_finite_in_float32_and_bf16
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer

import hf_extras
from hf_extras import (
    HfxMambaConfig,
    HfxMambaForCausalLM,
    HfxMambaForMaskedLM,
    HfxMambaForSequenceClassification,
    HfxMambaModel,
)
from hf_extras.convert import (
    export_to_transformers_mamba,
    hfx_config_from_mamba,
    hfx_state_dict_to_mamba,
    import_transformers_mamba,
    mamba_state_dict_to_hfx,
)
from hf_extras.models.modeling_mamba import HfxMambaMixer

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, chunk_size=8)


def hf_mamba(seed=0, **overrides) -> MambaForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, pad_token_id=0)
    kwargs.update(overrides)
    return MambaForCausalLM(MambaConfig(**kwargs)).eval()


# ----------------------------------------------------------------------------------------------------------------
# transformers interop
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias, use_conv_bias", [(False, True), (True, False)])
def test_mixer_parameters_match_transformers(use_bias, use_conv_bias):
    ours = HfxMambaMixer(HfxMambaConfig(**TINY, use_bias=use_bias, use_conv_bias=use_conv_bias), 0)
    theirs = MambaMixer(
        MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, use_bias=use_bias, use_conv_bias=use_conv_bias),
        0,
    )
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(use_bias=True, use_conv_bias=False, residual_in_fp32=False),
        dict(tie_word_embeddings=False, time_step_rank=5, expand=3, conv_kernel=3, state_size=4),
    ],
    ids=["default", "biases", "untied"],
)
def test_import_gives_transformers_logits(overrides):
    hf = hf_mamba(**overrides)
    ours = import_transformers_mamba(hf)
    assert type(ours) is HfxMambaForCausalLM and not ours.training
    ids = torch.randint(3, 96, (2, 45))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        for mode in ("recurrent", "parallel"):
            for layer in ours.model.layers:
                layer.mixer.forward_mode = mode
            torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_import_generates_like_transformers():
    hf = hf_mamba(seed=3)
    ours = import_transformers_mamba(hf)
    ids = torch.randint(3, 96, (1, 12))
    expected = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)


def test_round_trip_gives_identical_weights():
    hf = hf_mamba(use_bias=True, tie_word_embeddings=False)
    back = export_to_transformers_mamba(import_transformers_mamba(hf))
    assert type(back) is MambaForCausalLM
    original, restored = hf.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert back.config.intermediate_size == hf.config.intermediate_size
    assert back.config.time_step_rank == hf.config.time_step_rank


def test_key_map_is_one_to_one():
    hf = hf_mamba(use_bias=True)
    ours = HfxMambaForCausalLM(hfx_config_from_mamba(hf.config))
    renamed = mamba_state_dict_to_hfx(hf.state_dict())
    assert renamed.keys() == ours.state_dict().keys()
    for key, value in renamed.items():
        assert value.shape == ours.state_dict()[key].shape, key
    assert hfx_state_dict_to_mamba(renamed).keys() == hf.state_dict().keys()
    with pytest.raises(KeyError, match="not a parameter"):
        mamba_state_dict_to_hfx({"backbone.layers.0.mixer.q_proj.weight": torch.zeros(1)})


def test_import_from_saved_folder_keeps_dtype(tmp_path):
    hf = hf_mamba(seed=1)
    hf.save_pretrained(tmp_path / "mamba")
    ours = import_transformers_mamba(tmp_path / "mamba")
    ids = torch.randint(3, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    half = import_transformers_mamba(hf, dtype=torch.bfloat16)
    assert half.model.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    assert export_to_transformers_mamba(half).backbone.layers[0].mixer.A_log.dtype == torch.bfloat16


def test_converted_checkpoint_gets_every_head(tmp_path):
    """An imported HF Mamba checkpoint loads into the other heads (a bidirectional masked LM included) and trains."""
    import_transformers_mamba(hf_mamba(seed=2)).save_pretrained(tmp_path / "hfx")
    ids = torch.randint(3, 96, (2, 16))
    clf = HfxMambaForSequenceClassification.from_pretrained(tmp_path / "hfx", num_labels=2)
    out = clf(ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert clf.model.layers[0].mixer.A_log.grad is not None and torch.isfinite(out.loss)
    mlm = HfxMambaForMaskedLM.from_pretrained(tmp_path / "hfx", bidirectional=True)
    out = mlm(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(mlm.model.layers[1].mixer.A_log, clf.model.layers[1].mixer.A_log)


def test_export_refuses_what_transformers_cannot_express():
    model = HfxMambaForCausalLM(HfxMambaConfig(**TINY, ffn_type="glu"))
    with pytest.raises(ValueError, match="ffn_type"):
        export_to_transformers_mamba(model)
    with pytest.raises(ValueError, match="model_type"):
        hfx_config_from_mamba({"model_type": "llama"})


def test_config_mapping_and_validation():
    hf_config = MambaConfig(hidden_size=48, state_size=4, expand=3, layer_norm_epsilon=1e-6, time_step_rank="auto")
    config = hfx_config_from_mamba(hf_config)
    assert (config.mixer_intermediate_size, config.time_step_rank, config.norm_eps) == (144, 3, 1e-6)
    assert config.ffn_type == "none" and config.residual_in_fp32 and config.model_type == "hfx_mamba"
    assert HfxMambaConfig(hidden_size=64).time_step_rank == 4
    for bad in (dict(state_size=0), dict(expand=0), dict(time_step_min=0.5, time_step_max=0.1)):
        with pytest.raises(Exception, match=next(iter(bad))):
            HfxMambaConfig(**TINY, **bad)


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


def set_mode(model, mode):
    for layer in model.layers:
        layer.mixer.forward_mode = mode


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forms_agree_with_gradients(bidirectional):
    torch.manual_seed(0)
    model = HfxMambaModel(HfxMambaConfig(**TINY, bidirectional=bidirectional)).double()
    ids = torch.randint(7, 96, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    results = {}
    for mode in ("recurrent", "chunkwise", "parallel"):
        model.zero_grad()
        set_mode(model, mode)
        out = model(ids, attention_mask=mask).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        results[mode] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    ref_out, ref_grads = results["recurrent"]
    assert any("A_log" in n for n in ref_grads) and any("dt_proj" in n for n in ref_grads)
    for mode in ("chunkwise", "parallel"):
        out, grads = results[mode]
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-7, atol=1e-9, msg=name)


def test_left_padding_leaves_the_state_unchanged():
    """Padded tokens change neither the conv window nor the SSM state: the cached states equal the unpadded run's."""
    model = HfxMambaForCausalLM(HfxMambaConfig(**TINY, use_bias=True)).eval()
    ids = torch.randint(7, 96, (1, 13))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 13)], 1).long()
    with torch.no_grad():
        alone = model(ids, use_cache=True)
        with_pad = model(padded, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(with_pad.logits[:, 6:], alone.logits, rtol=1e-5, atol=1e-5)
    for i in range(model.config.num_hidden_layers):
        torch.testing.assert_close(
            with_pad.cache.read_recurrent(i), alone.cache.read_recurrent(i), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(with_pad.cache.read_conv(i), alone.cache.read_conv(i), rtol=1e-5, atol=1e-6)


def test_cache_holds_conv_and_ssm_state_per_layer():
    config = HfxMambaConfig(**TINY)
    model = HfxMambaForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(torch.randint(7, 96, (3, 10)), use_cache=True).cache
    d_inner = config.mixer_intermediate_size
    for i in range(config.num_hidden_layers):
        assert cache.read_recurrent(i).shape == (3, d_inner, config.state_size)
        assert cache.read_recurrent(i).dtype == torch.float32
        assert cache.read_conv(i).shape == (3, d_inner, config.conv_kernel - 1)


def test_initialisation_matches_transformers_and_survives_loading(tmp_path):
    """S4D-real A, D = 1, dt in [time_step_min, time_step_max]; also for weights a checkpoint lacks."""
    from safetensors.torch import load_file, save_file

    config = HfxMambaConfig(**TINY)
    model = HfxMambaForCausalLM(config)
    mixer = model.model.layers[0].mixer
    expected_A_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(64, -1)
    torch.testing.assert_close(mixer.A_log.detach(), expected_A_log)
    torch.testing.assert_close(mixer.D.detach(), torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert (dt >= config.time_step_min * 0.999).all() and (dt <= config.time_step_max * 1.001).all()
    assert mixer.dt_proj.weight.abs().max() <= config.time_step_rank**-0.5
    # a checkpoint without A_log / D / dt_proj: from_pretrained initialises them like a fresh model
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.endswith(("A_log", ".D", "dt_proj.bias"))},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    reloaded = HfxMambaForCausalLM.from_pretrained(tmp_path)
    rmixer = reloaded.model.layers[1].mixer
    torch.testing.assert_close(rmixer.A_log.detach(), expected_A_log)
    torch.testing.assert_close(rmixer.D.detach(), torch.ones(64))
    rdt = torch.nn.functional.softplus(rmixer.dt_proj.bias.detach())
    assert (rdt >= config.time_step_min * 0.999).all() and (rdt <= config.time_step_max * 1.001).all()
    torch.testing.assert_close(rmixer.in_proj.weight, model.model.layers[1].mixer.in_proj.weight)


@pytest.mark.parametrize("dt_bias", [-30.0, 30.0])
def test_long_sequence_with_extreme_dt_stays_finite(dt_bias):
    """4096 tokens, dt pushed to ~0 or to ~30 (log decays down to -240 per step): finite in float32 and bf16."""
    model = HfxMambaForCausalLM(HfxMambaConfig(**{**TINY, "chunk_size": 64, "num_hidden_layers": 1}))
    with torch.no_grad():
        model.model.layers[0].mixer.dt_proj.bias.fill_(dt_bias)
    assert_finite_in_float32_and_bf16(model, torch.randint(7, 96, (1, 4096)))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = HfxMambaForCausalLM(HfxMambaConfig(**TINY))
    ids = torch.randint(7, 96, (2, 20))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_on_the_mixer_projections(tmp_path):
    peft = pytest.importorskip("peft")
    model = import_transformers_mamba(hf_mamba(seed=4))
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["in_proj", "x_proj", "out_proj"], init_lora_weights=False)
    )
    ids = torch.randint(3, 96, (2, 12))
    out = lora(input_ids=ids, labels=ids)
    out.loss.backward()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora.save_pretrained(tmp_path / "adapter")
    base = import_transformers_mamba(hf_mamba(seed=4))
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lora(input_ids=ids).logits)


def test_public_names():
    for name in (
        "HfxMambaConfig",
        "HfxMambaModel",
        "HfxMambaForCausalLM",
        "HfxMambaForMaskedLM",
        "HfxMambaForSequenceClassification",
        "HfxMambaForTokenClassification",
        "HfxMambaForQuestionAnswering",
    ):
        assert name in hf_extras.__all__ and hasattr(hf_extras, name)
