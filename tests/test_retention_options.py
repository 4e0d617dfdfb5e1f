"""Retention options added for exact fla imports: `key_factor`, `use_output_gate`, `gate_clamp_min` (defaults unchanged)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_extras import GatedRetentionConfig, GatedRetentionForCausalLM, RetNetConfig, RetNetForCausalLM

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=4)
NEW_FIELDS = ("key_factor", "use_output_gate", "gate_clamp_min")


def logits_in_every_form(model, ids):
    out = {}
    for mode in ("parallel", "chunkwise", "recurrent"):
        for layer in model.model.layers:
            layer.mixer.forward_mode = mode
        with torch.no_grad():
            out[mode] = model(ids).logits
    return out


def test_defaults_keep_the_old_shapes_and_old_folders_load(tmp_path):
    for config_class, model_class, extra in (
        (RetNetConfig, RetNetForCausalLM, {}),
        (GatedRetentionConfig, GatedRetentionForCausalLM, dict(use_short_conv=True)),
    ):
        config = config_class(**TINY, **extra)
        assert config.key_factor == 1.0 and config.use_output_gate and config.head_dim == 16
        model = model_class(config).eval()
        mixer = model.model.layers[0].mixer
        assert mixer.q_proj.weight.shape == (32, 32) and mixer.g_proj.weight.shape[1] == 32
        model.save_pretrained(tmp_path / "m")
        saved = json.loads((tmp_path / "m" / "config.json").read_text())
        for field in NEW_FIELDS:  # a folder saved before these fields existed
            saved.pop(field, None)
        (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
        loaded = model_class.from_pretrained(tmp_path / "m").eval()
        ids = torch.randint(3, 96, (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config_class, model_class, extra",
    [
        (RetNetConfig, RetNetForCausalLM, {}),
        (GatedRetentionConfig, GatedRetentionForCausalLM, dict(gate="key", use_short_conv=True)),
        (GatedRetentionConfig, GatedRetentionForCausalLM, dict(gate="head", use_rotary=True)),
    ],
)
@pytest.mark.parametrize("key_factor", [0.5, 2.0])
def test_key_factor_sets_qk_width_and_forms_and_cache_agree(config_class, model_class, extra, key_factor):
    config = config_class(**TINY, **extra, key_factor=key_factor, use_output_gate=False)
    model = model_class(config).eval()
    mixer = model.model.layers[0].mixer
    key_width = int(32 * key_factor)
    assert config.head_dim == key_width // 2 and mixer.head_dim == key_width // 2
    assert mixer.q_proj.weight.shape == (key_width, 32) and mixer.k_proj.weight.shape == (key_width, 32)
    assert mixer.v_proj.weight.shape == (32 * config.value_factor, 32) and mixer.g_proj is None
    if extra.get("gate") == "key":
        assert mixer.gk_proj[1].weight.shape == (key_width, config.gate_low_rank_dim)
    ids = torch.randint(3, 96, (2, 11))
    forms = logits_in_every_form(model, ids)
    torch.testing.assert_close(forms["chunkwise"], forms["recurrent"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(forms["parallel"], forms["recurrent"], rtol=1e-5, atol=1e-5)
    for layer in model.model.layers:
        layer.mixer.forward_mode = "auto"
    with torch.no_grad():
        cached = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids[:1], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_output_gate_off_drops_g_proj_and_feeds_the_normed_output_to_o_proj():
    model = GatedRetentionForCausalLM(GatedRetentionConfig(**TINY, use_output_gate=False)).eval()
    assert not any("g_proj" in key for key in model.state_dict())
    mixer = model.model.layers[0].mixer
    seen = {}
    mixer.g_norm.register_forward_hook(lambda module, args, out: seen.update(normed=out))
    mixer.o_proj.register_forward_hook(lambda module, args, out: seen.update(o_in=args[0]))
    with torch.no_grad():
        mixer(torch.randn(2, 5, 32))
    torch.testing.assert_close(seen["o_in"], seen["normed"].flatten(-2), rtol=0, atol=0)
    ids = torch.randint(3, 96, (2, 7))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gate_clamp_min_bounds_the_log_decays():
    config = GatedRetentionConfig(**TINY, gate_clamp_min=-0.01)
    mixer = GatedRetentionForCausalLM(config).model.layers[0].mixer
    free = GatedRetentionForCausalLM(GatedRetentionConfig(**TINY)).model.layers[0].mixer
    free.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        for m in (mixer, free):
            m.gk_proj[1].bias.fill_(-6.0)  # logsigmoid(-6) / 16 = -0.375 < -0.01
    x = torch.randn(1, 6, 32)
    assert free.log_decay(x).min() < -0.3
    clamped = mixer.log_decay(x)
    assert clamped.min() >= -0.01 and torch.equal(clamped, free.log_decay(x).clamp_min(-0.01))


@pytest.mark.parametrize(
    "config_class, field, value",
    [
        (RetNetConfig, "key_factor", 0.3),  # 32 * 0.3 is not a whole channel count
        (GatedRetentionConfig, "key_factor", 0.03125),  # one key channel for two heads
        (GatedRetentionConfig, "gate_clamp_min", 0.5),
    ],
)
def test_bad_option_values_raise_naming_the_field(config_class, field, value):
    with pytest.raises(Exception, match=field):
        config_class(**TINY, **{field: value})
