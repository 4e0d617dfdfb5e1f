"""Hybrid layer schedules (issue 20): softmax attention blocks among a family's own mixers, one mixed cache."""

from __future__ import annotations

import json

import pytest
import torch
from families import HEADS, head_config
from families import Family as _Family
from huggingface_hub.errors import StrictDataclassError
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

import hf_extras
from hf_extras.models.attention import MultiHeadSelfAttention
from hf_extras.models.hybrid import hybrid_schedule

FULL = ["linear_attention", "full_attention", "linear_attention"]
SLIDING = ["linear_attention", "sliding_attention", "full_attention"]

HYBRIDS = [
    _Family("retnet", hf_extras.RetNetConfig, "RetNet"),
    _Family("gated_retention", hf_extras.GatedRetentionConfig, "GatedRetention", dict(gate="key")),
    _Family("mamba", hf_extras.HfxMambaConfig, "HfxMamba", dict(state_size=8, num_heads=2)),
    _Family("mamba2", hf_extras.HfxMamba2Config, "HfxMamba2", dict(state_size=8, num_heads=4, n_groups=2)),
    _Family("gated_deltanet", hf_extras.GatedDeltaNetConfig, "GatedDeltaNet", dict(gate="head")),
]
ids_of = dict(ids=lambda f: f.name)


def hybrid_lm(family, layer_types=FULL, **overrides):
    config = family.config(num_hidden_layers=len(layer_types), layer_types=layer_types, sliding_window=4, **overrides)
    torch.manual_seed(0)
    return family.cls("ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_schedule_builds_attention_blocks(family):
    model = hybrid_lm(family, SLIDING)
    mixers = [layer.mixer for layer in model.model.layers]
    assert not isinstance(mixers[0], MultiHeadSelfAttention)
    assert isinstance(mixers[1], MultiHeadSelfAttention) and mixers[1].sliding_window == 4
    assert isinstance(mixers[2], MultiHeadSelfAttention) and mixers[2].sliding_window is None


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_cache_equals_no_cache(family, mode):
    model = hybrid_lm(family, SLIDING)
    ids = torch.randint(7, 96, (2, 13))  # longer than the window and than a chunk
    kwargs = {"greedy": dict(do_sample=False), "beam": dict(num_beams=3), "sample": dict(do_sample=True, top_k=8)}
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(1)
        outs.append(model.generate(ids, max_new_tokens=8, use_cache=use_cache, pad_token_id=0, **kwargs[mode]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_cached_logits_match_full_forward(family):
    model = hybrid_lm(family, SLIDING)
    ids = torch.randint(7, 96, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :9], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(9, 14):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_left_padding_changes_nothing(family):
    model = hybrid_lm(family, SLIDING)
    ids = torch.randint(7, 96, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits, rtol=1e-4, atol=1e-4
        )
    alone = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    batched = model.generate(
        torch.cat([padded, torch.randint(7, 96, (1, 13))]),
        attention_mask=torch.cat([mask, torch.ones(1, 13, dtype=torch.long)]),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(batched[0, 3:], alone[0])


def test_cache_grows_only_with_attention_layers():
    """Linear layers keep a fixed state, sliding layers at most `sliding_window` keys, full layers every token."""
    model = hybrid_lm(HYBRIDS[0], SLIDING)
    with torch.no_grad():
        cache = model(torch.randint(7, 96, (1, 12)), use_cache=True).cache
        linear_state = cache.layers[0].recurrent_states[0].shape
        for _ in range(5):
            cache = model(torch.randint(7, 96, (1, 1)), cache=cache, use_cache=True).cache
    layers = cache.layers
    assert isinstance(layers[0], LinearAttentionLayer) and layers[0].recurrent_states[0].shape == linear_state
    assert isinstance(layers[1], DynamicSlidingWindowLayer) and layers[1].keys.shape[-2] <= 4
    assert isinstance(layers[2], DynamicLayer) and layers[2].keys.shape[-2] == 17
    assert cache.get_seq_length() == 17


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_loss_and_gradients(family, head):
    config = head_config(family, head, num_hidden_layers=3, layer_types=SLIDING, sliding_window=4)
    model = family.cls(head)(config)
    ids = torch.randint(7, 96, (2, 10))
    labels = {
        "Model": None,
        "ForCausalLM": ids,
        "ForMaskedLM": ids,
        "ForSequenceClassification": torch.tensor([0, 2]),
        "ForTokenClassification": torch.randint(0, 3, (2, 10)),
    }
    if head == "ForQuestionAnswering":
        out = model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    elif head == "Model":
        out = model(ids)
        out.loss = out.last_hidden_state.square().mean()
    else:
        out = model(ids, labels=labels[head])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    attention = model.get_decoder() if hasattr(model, "get_decoder") else model
    attention = attention.layers[1].mixer if hasattr(attention, "layers") else None
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    if attention is not None:
        assert attention.q_proj.weight.grad is not None and attention.q_proj.weight.grad.abs().sum() > 0


def test_bidirectional_attention_layers_see_the_future():
    config = HYBRIDS[0].config(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    config.bidirectional = True
    model = HYBRIDS[0].cls("Model")(config).eval()
    ids = torch.randint(7, 96, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 96
    with torch.no_grad():
        before, after = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert not torch.allclose(before[0, 0], after[0, 0])


@pytest.mark.parametrize("family", HYBRIDS[:1] + HYBRIDS[2:3], **ids_of)
def test_seq2seq_hybrid_encoder_and_decoder(family):
    config = family.config(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    model = family.cls("ForConditionalGeneration")(config).eval()
    src, tgt = torch.randint(7, 96, (2, 9)), torch.randint(7, 96, (2, 6))
    assert isinstance(model.get_encoder().layers[1].mixer, MultiHeadSelfAttention)
    loss = model(input_ids=src, labels=tgt).loss
    loss.backward()
    assert torch.isfinite(loss)
    outs = [model.generate(src, max_new_tokens=5, do_sample=False, use_cache=c) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_all_linear_schedule_is_todays_model(family, tmp_path):
    """`layer_types` all "linear_attention" == the default (None) == a folder saved before hybrids existed."""
    torch.manual_seed(0)
    today = family.cls("ForCausalLM")(family.config()).eval()
    torch.manual_seed(0)
    explicit = family.cls("ForCausalLM")(family.config(layer_types=["linear_attention"] * 2)).eval()
    assert list(today.state_dict()) == list(explicit.state_dict())
    ids = torch.randint(7, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(today(ids).logits, explicit(ids).logits)
    today.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("layer_types")  # as written before the field existed
    saved.pop("sliding_window")
    config_file.write_text(json.dumps(saved))
    loaded = family.cls("ForCausalLM").from_pretrained(tmp_path).eval()
    assert loaded.config.layer_types is None and not loaded.config.is_hybrid
    assert list(loaded.state_dict()) == list(today.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, today(ids).logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_types=["linear_attention"]), "num_hidden_layers"),
        (dict(layer_types=["linear_attention", "chunked_attention"]), "layer_types"),
        (dict(layer_types=["linear_attention", "sliding_attention"]), "sliding_window"),
    ],
)
@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_bad_schedule_fails_at_construction(family, overrides, message):
    with pytest.raises((StrictDataclassError, ValueError), match=message):
        family.config(**overrides)


def test_dyt_refuses_a_schedule():
    with pytest.raises((StrictDataclassError, ValueError), match="layer_types"):
        hf_extras.DyTConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    assert hf_extras.DyTConfig(num_hidden_layers=2).layer_types == ["full_attention"] * 2


def test_presets():
    assert hybrid_schedule("3:1", 8) == (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert hybrid_schedule("3:1-sliding", 4)[3] == "sliding_attention"
    assert hybrid_schedule("linear", 2) == ["linear_attention"] * 2
    with pytest.raises(ValueError, match="schedule"):
        hybrid_schedule("three to one", 4)


def test_peft_default_targets_cover_attention_layers():
    peft = pytest.importorskip("peft")
    for family in HYBRIDS:
        model = hybrid_lm(family, FULL)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=2))
        assert any(
            isinstance(m, peft.tuners.lora.LoraLayer) for m in lora.base_model.model.model.layers[1].mixer.modules()
        )


def test_cli_reads_layer_types_from_yaml_and_command_line(tmp_path):
    import yaml

    from hf_extras.cli import parse_train_args
    from hf_extras.training import build_config

    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(
                task="causal_lm",
                model_type="hfx_retnet",
                num_hidden_layers=2,
                layer_types=["linear_attention", "sliding_attention"],
                sliding_window=16,
                output_dir=str(tmp_path),
            )
        )
    )
    args = parse_train_args(str(path))
    assert args.model_overrides["layer_types"] == ["linear_attention", "sliding_attention"]
    assert args.model_overrides["sliding_window"] == 16
    config = build_config("hfx_retnet", args.model_overrides)
    assert config.layer_types == ["linear_attention", "sliding_attention"] and config.is_hybrid
    args = parse_train_args(str(path), ["--layer_types", "full_attention", "linear_attention"])
    assert args.model_overrides["layer_types"] == ["full_attention", "linear_attention"]


def test_attention_layers_agree_under_eager_and_sdpa():
    """The attention blocks go through transformers' attention interface: SDPA gives eager's numbers and tokens."""
    model = hybrid_lm(HYBRIDS[4], SLIDING)
    ids = torch.randint(7, 96, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    results = []
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        results.append((logits, tokens))
    torch.testing.assert_close(results[0][0][1], results[1][0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][0][0, 3:], results[1][0][0, 3:], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", HYBRIDS, **ids_of)
def test_attention_layers_default_to_sdpa(family, tmp_path):
    """Like Llama, a hybrid's attention layers run SDPA unless asked otherwise (before, every linear family fell back
    to eager attention: a 3x slower 8k training step); the choice survives save/load and `attn_implementation=`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family.config(num_hidden_layers=3, layer_types=FULL))
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_bench_registers_hybrid_rows():
    from hf_extras.bench import models as bench

    dims = bench.Dims()
    target = bench.llama_non_embedding_params(dims)
    for name in ("retnet_hybrid", "gla_hybrid", "gated_deltanet_hybrid"):
        with torch.device("meta"):
            model = bench.MODELS[name].build(dims)
        assert model.config.layer_types == hybrid_schedule("3:1", dims.num_hidden_layers)
        got = bench.count_parameters(model)["params_non_embedding"]
        assert abs(got - target) <= 12_288 + 64 * 4, (name, got, target)
