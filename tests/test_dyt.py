"""DyT Transformer family and `convert_norms_to_dyt`: numerics, initialisation rules, attention implementations,
KV-cache generation, every head and position type, conversion of transformers models (Llama, GPT-2, BERT, ViT)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_without_hf_extras
from torch import nn

import hf_extras
from hf_extras import DyT, DyTConfig, convert_norms_to_dyt, load_dyt_model
from hf_extras.models.configuration_dyt import paper_llm_alphas

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2)

# the classic Transformer baseline, a LLaMA-style decoder with learned positions, and the paper's LLM recipe
VARIANTS = {
    "classic": dict(norm_type="layernorm", position_embedding_type="sinusoidal", ffn_type="mlp", hidden_act="relu"),
    "rms_learned": dict(norm_type="rmsnorm", position_embedding_type="learned", max_position_embeddings=64),
    "dyt_paper": dict(norm_type="dyt", position_embedding_type="rotary", dyt_init="paper_llm"),
}


def tiny(**overrides) -> DyTConfig:
    return DyTConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------------------- DyT


def test_dyt_numerics_and_parameter_shapes():
    assert hf_extras.DyT is DyT
    layer = DyT(6, alpha_init=0.7)
    assert layer.alpha.shape == (1,) and layer.weight.shape == (6,) and layer.bias.shape == (6,)
    torch.testing.assert_close(layer.alpha, torch.tensor([0.7]))
    assert torch.equal(layer.weight, torch.ones(6)) and torch.equal(layer.bias, torch.zeros(6))
    assert DyT(4).alpha.item() == 0.5  # the paper's default
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-2, 2, 6))
        layer.bias.copy_(torch.linspace(0, 1, 6))
    x = torch.randn(3, 5, 6) * 4
    expected = layer.weight * torch.tanh(0.7 * x) + layer.bias
    torch.testing.assert_close(layer(x), expected)
    # element-wise and bounded: |out - bias| <= |weight|, no statistics over tokens or channels
    assert ((layer(x) - layer.bias).abs() <= layer.weight.abs() + 1e-6).all()
    torch.testing.assert_close(layer(x[:1, :2]), layer(x)[:1, :2])
    y = layer(x.requires_grad_())
    y.sum().backward()
    assert layer.alpha.grad is not None and layer.alpha.grad.shape == (1,)


def test_paper_llm_alpha_table():
    assert paper_llm_alphas(256) == (1.0, 1.0)
    assert paper_llm_alphas(1024) == (1.0, 1.0)
    assert paper_llm_alphas(2048) == (1.0, 0.5)
    assert paper_llm_alphas(4096) == (0.8, 0.2)  # LLaMA 7B
    assert paper_llm_alphas(5120) == (0.6, 0.15)  # LLaMA 13B
    assert paper_llm_alphas(8192) == (0.2, 0.05)  # LLaMA 34B / 70B
    config = DyTConfig(hidden_size=4096, num_heads=32, num_hidden_layers=2, dyt_init="paper_llm")
    assert (config.dyt_attn_alpha_init, config.dyt_alpha_init) == (0.8, 0.2)
    assert config.embedding_scale is True
    assert DyTConfig(**TINY).embedding_scale is True  # norm_type="dyt" needs O(1) inputs
    assert DyTConfig(**TINY, norm_type="layernorm").embedding_scale is False
    assert DyTConfig(**TINY, embedding_scale=False).embedding_scale is False
    assert DyTConfig(**TINY, dyt_init="paper_llm", embedding_scale=False).embedding_scale is False


def _alphas(model):
    return (
        [layer.mixer_norm.alpha.item() for layer in model.layers],
        [layer.ffn_norm.alpha.item() for layer in model.layers],
        model.norm.alpha.item(),
    )


def test_attention_side_alpha_and_embedding_scale_are_wired():
    model = hf_extras.DyTModel(tiny(dyt_attn_alpha_init=0.9, dyt_alpha_init=0.3, embedding_scale=True))
    attn, ffn, final = _alphas(model)
    assert attn == pytest.approx([0.9, 0.9]) and ffn == pytest.approx([0.3, 0.3]) and final == pytest.approx(0.3)
    assert model.embed_scale.scale.item() == pytest.approx(math.sqrt(32))
    paper = hf_extras.DyTModel(tiny(dyt_init="paper_llm", embedding_scale_init=2.0))
    assert _alphas(paper) == ([1.0, 1.0], [1.0, 1.0], 1.0)  # width 32: the narrow row of the table
    assert paper.embed_scale.scale.item() == 2.0
    ids = torch.randint(7, 96, (1, 5))
    out = paper(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0], 2.0 * paper.embed_tokens(ids))  # rotary: nothing added


def test_custom_parameters_are_initialised_on_load(tmp_path):
    """from_pretrained runs _init_weights on missing tensors only: DyT alpha and the embedding scale must get their
    initial values there, not garbage (the "initialisation on load" trap)."""
    from safetensors.torch import load_file, save_file

    config = tiny(dyt_attn_alpha_init=0.9, dyt_alpha_init=0.3, embedding_scale=True, embedding_scale_init=3.0)
    model = hf_extras.DyTForCausalLM(config)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in state if k.endswith(".alpha") or "embed_scale" in k]
    assert len(dropped) == 2 * 2 + 1 + 1
    save_file(
        {k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors", metadata={"format": "pt"}
    )
    loaded = hf_extras.DyTForCausalLM.from_pretrained(tmp_path)
    attn, ffn, final = _alphas(loaded.model)
    assert attn == pytest.approx([0.9, 0.9]) and ffn == pytest.approx([0.3, 0.3]) and final == pytest.approx(0.3)
    assert loaded.model.embed_scale.scale.item() == 3.0


def test_invalid_dyt_config_values():
    from huggingface_hub.errors import StrictDataclassError

    for bad, field in [
        (dict(position_embedding_type="alibi"), "position_embedding_type"),
        (dict(dyt_init="paper"), "dyt_init"),
        (dict(dyt_alpha_init=-0.5), "dyt_alpha_init"),
        (dict(hidden_size=30, num_heads=2), "rotary"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(attention_dropout=1.0), "attention_dropout"),
    ]:
        with pytest.raises(StrictDataclassError, match=field):
            tiny(**bad)


# ------------------------------------------------------------------------------------------- the family itself


def test_norm_types_build_the_right_layers():
    from hf_extras.models.norms import LayerNorm, RMSNorm

    for norm_type, cls in [("dyt", DyT), ("layernorm", LayerNorm), ("rmsnorm", RMSNorm)]:
        model = hf_extras.DyTModel(tiny(norm_type=norm_type))
        norms = [m for m in model.modules() if isinstance(m, (DyT, LayerNorm, RMSNorm))]
        assert len(norms) == 2 * 2 + 1 and all(type(m) is cls for m in norms), norm_type


def test_classic_transformer_adds_sinusoidal_positions():
    from hf_extras.models.positions import sinusoidal_embedding

    model = hf_extras.DyTModel(tiny(**VARIANTS["classic"]))
    ids = torch.randint(7, 96, (2, 9))
    out = model(ids, output_hidden_states=True)
    positions = torch.arange(9).unsqueeze(0).expand(2, -1)
    torch.testing.assert_close(out.hidden_states[0], model.embed_tokens(ids) + sinusoidal_embedding(positions, 32))
    assert all(isinstance(layer.ffn, hf_extras.models.ffn.MLP) for layer in model.layers)


def test_learned_positions_refuse_inputs_past_the_table():
    model = hf_extras.DyTModel(tiny(position_embedding_type="learned", max_position_embeddings=8))
    model(torch.randint(7, 96, (1, 8)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(7, 96, (1, 9)))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_direction(bidirectional):
    model = hf_extras.DyTModel(tiny(bidirectional=bidirectional)).eval()
    assert all(layer.mixer.is_causal is (not bidirectional) for layer in model.layers)
    ids = torch.randint(7, 96, (1, 8))
    changed = ids.clone()
    changed[0, -1] = 7 if ids[0, -1] != 7 else 8
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    assert torch.allclose(a[:, :-1], b[:, :-1]) is (not bidirectional)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_eager_and_sdpa_agree(variant, bidirectional):
    torch.manual_seed(0)
    model = hf_extras.DyTModel(tiny(bidirectional=bidirectional, **VARIANTS[variant])).eval()
    ids = torch.randint(7, 96, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    outs = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            outs[impl] = (model(ids, attention_mask=mask).last_hidden_state, model(ids).last_hidden_state)
    real = mask.bool()
    torch.testing.assert_close(outs["eager"][0][real], outs["sdpa"][0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["eager"][1], outs["sdpa"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_head_trains_a_step(variant):
    from test_heads import HEAD_NAMES, batch_for

    for head in HEAD_NAMES:
        bidirectional = head == "ForMaskedLM" or (head != "ForCausalLM" and variant == "classic")
        config = tiny(bidirectional=bidirectional, num_labels=3, attention_dropout=0.1, **VARIANTS[variant])
        torch.manual_seed(0)
        model = getattr(hf_extras, f"DyT{head}")(config)
        inputs = batch_for(head, config.vocab_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with torch.no_grad():
            before = model.eval()(**inputs).loss
        loss = model.train()(**inputs).loss  # with attention dropout
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (head, missing)
        optimizer.step()
        with torch.no_grad():
            after = model.eval()(**inputs).loss
        assert torch.isfinite(loss) and torch.isfinite(after) and after < before, (head, before, after)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_with_cache_equals_without(variant, attn):
    torch.manual_seed(0)
    model = hf_extras.DyTForCausalLM(tiny(**VARIANTS[variant])).eval()
    model.set_attn_implementation(attn)
    short, long = torch.randint(7, 96, (1, 6)), torch.randint(7, 96, (1, 13))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :7] = 0
    outs = [
        model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])
    alone = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(outs[0][0, 7:], alone[0])  # left padding changes nothing


def test_kv_cache_grows_and_matches_full_forward():
    from transformers import DynamicCache

    model = hf_extras.DyTForCausalLM(tiny()).eval()
    ids = torch.randint(7, 96, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def decode(step_mask):
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :12], attention_mask=mask[:, :12], cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 12
        steps = [out.logits]
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], attention_mask=step_mask(t), cache=cache, use_cache=True)
            steps.append(out.logits)
        assert cache.get_seq_length() == 20
        assert cache.layers[0].keys.shape == (2, 2, 20, 16)
        return torch.cat(steps, 1)

    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        whole = decode(lambda t: mask[:, : t + 1])  # as generate() passes it
        new_only = decode(lambda t: mask[:, t : t + 1])  # cached tokens taken as real
    real = mask.bool()
    atol = 1e-5 * full.abs().max().item()  # float32 rounding, relative to the logits' scale
    torch.testing.assert_close(whole[real], full[real], rtol=1e-4, atol=atol)
    # a mask of the new tokens only: right for the unpadded row; the left-padded row needs the whole mask
    torch.testing.assert_close(new_only[0], full[0], rtol=1e-4, atol=atol)
    assert not torch.allclose(new_only[1, 12:], full[1, 12:], rtol=1e-4, atol=atol)
    with pytest.raises(TypeError, match="Cache"):
        model(ids, cache=object(), use_cache=True)


def test_remote_code_load_of_a_variant_with_extra_modules(tmp_path):
    """Learned positions + embedding scale + attention-side alpha survive a load without hf_extras."""
    config = tiny(
        position_embedding_type="learned", max_position_embeddings=32, dyt_init="paper_llm", dyt_attn_alpha_init=0.9
    )
    model = hf_extras.DyTForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_scale.scale.fill_(1.7)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.randint(7, 96, (1, 10))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    result = run_without_hf_extras(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        ref = torch.load("{tmp_path}/expected.pt")
        model = AutoModelForCausalLM.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True).eval()
        assert type(model).__name__ == "DyTForCausalLM" and "hf_extras" not in type(model).__module__
        with torch.no_grad():
            # same weights and code; SDPA's CPU kernel may split work differently across processes/threads
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=1e-6, atol=1e-7)
        eager = AutoModelForCausalLM.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True, attn_implementation="eager")
        with torch.no_grad():
            torch.testing.assert_close(eager.eval()(ref["ids"]).logits, ref["logits"], rtol=1e-5, atol=1e-5)
        print("REMOTE_OK")
        """,
        cwd=str(tmp_path),
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ convert_norms_to_dyt


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def _tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config)


def _batch(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2, 1])}
    ids = torch.randint(0, 64, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _output(out):
    return out.logits


MODELS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2, "bert": _tiny_bert, "vit": _tiny_vit}
EXPECTED_NORMS = {"llama": 2 * 2 + 1, "gpt2": 2 * 2 + 1, "bert": 1 + 2 * 2 + 1, "vit": 2 * 2 + 1}


def _norms_left(model):
    return [
        n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(m).__name__
    ]


@pytest.mark.parametrize("kind", list(MODELS))
def test_convert_norms_to_dyt(kind, tmp_path):
    torch.manual_seed(0)
    model = MODELS[kind]()
    norms = {n: m for n, m in model.named_modules() if n in set(_norms_left(model))}
    assert len(norms) == EXPECTED_NORMS[kind], sorted(norms)
    with torch.no_grad():  # non-trivial affine parameters, to check that they are carried over
        for m in norms.values():
            m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.1, 0.1)
    affine = {n: (m.weight.clone(), getattr(m, "bias", None)) for n, m in norms.items()}

    assert convert_norms_to_dyt(model) is model
    assert _norms_left(model) == []
    dyts = dict((n, m) for n, m in model.named_modules() if isinstance(m, DyT))
    assert sorted(dyts) == sorted(norms)
    for name, (weight, bias) in affine.items():
        assert torch.equal(dyts[name].weight, weight) and dyts[name].alpha.item() == 0.5
        assert torch.equal(dyts[name].bias, bias if bias is not None else torch.zeros_like(weight))
    assert model.config.dyt_conversion == {"modules": sorted(norms)}
    convert_norms_to_dyt(model)  # nothing left to convert: the record stays
    assert model.config.dyt_conversion == {"modules": sorted(norms)}

    batch = _batch(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        assert all(m.alpha.grad is not None for m in dyts.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any(m.alpha.item() != 0.5 for m in dyts.values())  # alpha trained

    model.eval()
    model.save_pretrained(tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reloaded = load_dyt_model(str(tmp_path)).eval()
    assert type(reloaded) is type(model) and _norms_left(reloaded) == []
    with torch.no_grad():
        torch.testing.assert_close(_output(reloaded(**inputs)), _output(model(**inputs)), rtol=0, atol=0)


def test_convert_alpha_callable_and_plain_modules():
    model = _tiny_llama()
    convert_norms_to_dyt(model, alpha_init=lambda name, norm: 0.8 if "input_layernorm" in name else 0.2)
    layer = model.model.layers[0]
    assert layer.input_layernorm.alpha.item() == pytest.approx(0.8)
    assert layer.post_attention_layernorm.alpha.item() == pytest.approx(0.2)
    assert model.model.norm.alpha.item() == pytest.approx(0.2)
    # plain torch modules: nn.RMSNorm without affine weights, a bare norm, and shared instances
    shared = nn.LayerNorm(8)
    seq = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8, elementwise_affine=False), shared, shared)
    convert_norms_to_dyt(seq)
    assert isinstance(seq[1], DyT) and seq[1].weight.shape == (8,) and seq[2] is seq[3]
    assert isinstance(convert_norms_to_dyt(nn.LayerNorm(4)), DyT)


def test_load_dyt_model_refuses_unconverted_folders(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="convert_norms_to_dyt"):
        load_dyt_model(str(tmp_path))


def test_default_dyt_language_model_learns_a_copy_task():
    """Regression: without the embedding scale, DyT saw 0.02-scale inputs and the LM stayed near uniform."""
    torch.manual_seed(0)
    model = hf_extras.DyTForCausalLM(DyTConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    half = torch.randint(7, 60, (8, 12))
    ids = torch.cat([half, half], dim=1)  # the second half repeats the first: learnable only by attending back
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 1.5, loss.item()  # uniform is log(64) = 4.16; about half the tokens are copyable


def test_final_dyt_weight_follows_the_width_rule():
    """The final DyT starts at max(1, 1 / (initializer_range * sqrt(width))); the others at 1; explicit values win."""
    model = hf_extras.DyTModel(tiny())  # width 32, range 0.02
    rule = 1 / (0.02 * math.sqrt(32))
    assert model.norm.weight.detach() == pytest.approx(torch.full((32,), rule))
    assert all(
        torch.equal(m.weight, torch.ones(32)) for m in model.modules() if isinstance(m, DyT) and m is not model.norm
    )
    assert hf_extras.DyTModel(tiny(dyt_final_weight_init=2.0)).norm.weight.detach() == pytest.approx(
        torch.full((32,), 2.0)
    )
    assert DyTConfig(hidden_size=4096, num_heads=32).resolved_dyt_final_weight_init == 1.0  # the paper's widths
    assert DyTConfig(hidden_size=128, initializer_range=0.05).resolved_dyt_final_weight_init == pytest.approx(
        1 / (0.05 * math.sqrt(128))
    )
    retnet = hf_extras.RetNetModel(hf_extras.RetNetConfig(hidden_size=32, num_heads=2, norm_type="dyt"))
    assert retnet.norm.weight.detach() == pytest.approx(torch.full((32,), rule))  # shared backbone: every family
    from huggingface_hub.errors import StrictDataclassError

    with pytest.raises(StrictDataclassError, match="dyt_final_weight_init"):
        tiny(dyt_final_weight_init=0.0)
    assert DyT((3, 4), 0.5, 2.0).weight.shape == (3, 4)  # a norm over several trailing dims (convert_norms_to_dyt)


def test_narrow_dyt_lm_leaves_the_unigram_plateau():
    """Regression for the DyT plateau (README, "Seq2seq"): at width 64, a final DyT starting at weight 1 bounds the
    tied head's logits near 0.02 * 8 * 1; the LM inflates its residual until every tanh saturates and stays at the
    unigram entropy. The width rule's initial weight lets the same model learn byte n-grams."""
    import inspect
    import json

    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    data = torch.tensor(list(text.encode()))
    counts = torch.bincount(data).float()
    probs = counts[counts > 0] / counts.sum()
    unigram = float(-(probs * probs.log()).sum())  # ~3.06 nats

    def final_loss(final_weight):
        torch.manual_seed(0)
        config = DyTConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=4, dyt_final_weight_init=final_weight
        )
        model = hf_extras.DyTForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        gen, losses = torch.Generator().manual_seed(0), []
        for step in range(100):
            starts = torch.randint(0, len(data) - 128, (8,), generator=gen)
            ids = torch.stack([data[i : i + 128] for i in starts])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return sum(losses[-10:]) / 10

    assert final_loss(None) < unigram - 0.4  # measured 2.47
    assert final_loss(1.0) > unigram - 0.15  # the old initialisation: measured 3.06, the plateau
