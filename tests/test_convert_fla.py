"""`from_fla`: flash-linear-attention's RetNet and GLA checkpoints imported into our models, logits equal to fla's.

fla's models are built with fla's own config and model classes on CPU. Their forward calls Triton kernels, which do not
run on CPU, so the reference is fla's model with each Triton call swapped for fla's own pure-PyTorch reference of
that op (`fla_on_cpu`): the retention/GLA kernels -> `fla.ops.{retention,gla}.naive`, fused RMSNorm ->
`rms_norm_ref`, the fused norm+swish gate -> `rms_norm_ref * silu(g)`, rotary -> `rotary_embedding_ref`, the short
conv -> its own `nn.Conv1d` weights through `F.conv1d`, SwiGLU -> `silu(x) * y`.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

fla = pytest.importorskip("fla")

from conftest import run_without_hf_extras  # noqa: E402
from fla.models import GLAConfig, GLAForCausalLM, RetNetConfig, RetNetForCausalLM  # noqa: E402
from transformers import AutoModelForTokenClassification  # noqa: E402

from hf_extras import GatedRetentionForCausalLM, RetNetModel  # noqa: E402
from hf_extras import RetNetForCausalLM as HfxRetNetForCausalLM  # noqa: E402
from hf_extras.convert import convert_fla_state_dict, fla_config_to_hfx, fla_key_to_hfx, from_fla  # noqa: E402

warnings.filterwarnings("ignore", message=".*Triton is not supported.*")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100, fuse_cross_entropy=False)
VARIANTS = {
    "retnet": (RetNetConfig, RetNetForCausalLM, {}),
    "retnet-nogate-k0.5-kv1-unfused": (
        RetNetConfig,
        RetNetForCausalLM,
        dict(use_output_gate=False, expand_k=0.5, num_kv_heads=1, fuse_norm=False, fuse_swiglu=False),
    ),
    "retnet-v1-noaffine-tied-ratio3": (
        RetNetConfig,
        RetNetForCausalLM,
        dict(expand_v=1.0, elementwise_affine=False, tie_word_embeddings=True, hidden_ratio=3),
    ),
    "gla": (GLAConfig, GLAForCausalLM, {}),
    "gla-conv-relu-clamp-kv": (
        GLAConfig,
        GLAForCausalLM,
        dict(
            use_short_conv=True,
            conv_size=3,
            feature_map="relu",
            clamp_min=-0.05,
            num_heads=4,
            num_kv_heads=2,
            expand_k=1.0,
            expand_v=2.0,
        ),
    ),  # fmt: skip
    "gla-nogate-unfused-noaffine": (
        GLAConfig,
        GLAForCausalLM,
        dict(use_output_gate=False, fuse_norm=False, elementwise_affine=False, intermediate_size=96),
    ),
}


@contextlib.contextmanager
def fla_on_cpu():
    """fla's models with every Triton call replaced by fla's own pure-PyTorch reference of the same op."""
    import fla.layers.gla as gla_layer
    import fla.layers.multiscale_retention as retention_layer
    import fla.modules.mlp as mlp_module
    import fla.modules.rotary.ops as rotary_module
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.retention.naive import naive_retention

    def retention(q, k, v, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
        assert initial_state is None and cu_seqlens is None
        return naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), None

    def gla(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
        assert cu_seqlens is None
        return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)

    def gain(norm, x):  # a norm without elementwise affine has no weight
        return norm.weight if norm.weight is not None else torch.ones(x.shape[-1])

    def rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_ref(x, gain(self, x), self.bias, residual=residual, eps=self.eps, prenorm=prenorm, upcast=True)

    def rms_norm_swish_gate(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        assert residual is None
        return rms_norm_ref(x, gain(self, x), None, eps=self.eps, upcast=True) * F.silu(g.float())

    def short_conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kwargs):
        assert residual is None and mask is None and cache is None and cu_seqlens is None
        width = self.kernel_size[0]
        y = F.conv1d(x.transpose(1, 2), self.weight, self.bias, padding=width - 1, groups=self.hidden_size)
        y = y[..., : x.shape[1]].transpose(1, 2)
        return (F.silu(y) if self.activation else y), None

    def rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, chunk_indices=None):
        assert isinstance(seqlen_offsets, int) and seqlen_offsets == 0 and cu_seqlens is None
        return rotary_module.rotary_embedding_ref(x, cos[: x.shape[1]], sin[: x.shape[1]], interleaved)

    kernels = ("chunk_retention", "fused_chunk_retention", "parallel_retention", "fused_recurrent_retention")
    patches = [mock.patch.object(retention_layer, name, retention) for name in kernels]
    patches += [mock.patch.object(gla_layer, n, gla) for n in ("chunk_gla", "fused_chunk_gla", "fused_recurrent_gla")]
    patches += [
        mock.patch.object(RMSNorm, "forward", rms_norm),
        mock.patch.object(FusedRMSNormGated, "forward", rms_norm_swish_gate),
        mock.patch.object(ShortConvolution, "forward", short_conv),
        mock.patch.object(rotary_module, "rotary_embedding", rotary),
        mock.patch.object(mlp_module, "swiglu", lambda x, y: F.silu(x) * y),
        mock.patch.object(mlp_module.SwiGLULinear, "forward", lambda self, x, y, w, b: F.linear(F.silu(x) * y, w, b)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def build_fla(variant: str):
    """A tiny fla causal LM of `variant` with every parameter random (norm gains around 1, gate biases spread)."""
    config_class, model_class, extra = VARIANTS[variant]
    config = config_class(**{**TINY, **extra})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if param.dim() > 1 else 0.5
            param.copy_(torch.randn_like(param) * scale + (1.0 if "norm" in name else 0.0))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embeddings.weight
    return model


def fla_logits(model, ids):
    with torch.no_grad(), fla_on_cpu():
        return model(ids).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_fla_reference(variant):
    fla_model = build_fla(variant)
    ids = torch.randint(0, 100, (2, 20))
    expected = fla_logits(fla_model, ids)
    ours = from_fla(fla_model.state_dict(), fla_model.config)
    assert isinstance(ours, (HfxRetNetForCausalLM, GatedRetentionForCausalLM))
    for mode in ("parallel", "chunkwise", "recurrent"):  # every form of ours, chunks of 8 over 20 tokens
        ours.config.forward_mode = mode
        for layer in ours.model.layers:
            layer.mixer.forward_mode, layer.mixer.chunk_size = mode, 8
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_fla_tensor_consumed_exactly_once(variant):
    fla_model = build_fla(variant)
    fla_state = fla_model.state_dict()
    ours = from_fla(fla_state, fla_model.config)
    our_state = ours.state_dict()
    config = fla_model.config
    targets: dict[str, list[str]] = {}
    for key in fla_state:
        target = fla_key_to_hfx(key)
        assert target is not None, key
        targets.setdefault(target, []).append(key)
    for target, sources in targets.items():  # only the three short convs share one tensor of ours (q|k|v)
        assert len(sources) == 1 or target.endswith("mixer.conv1d.weight") and len(sources) == 3, sources
    expected = set(our_state)
    if config.tie_word_embeddings:  # fla's tied lm_head is consumed by the check that it equals the embeddings
        expected.discard("lm_head.weight")
        targets.pop("lm_head.weight", None)
    filled = set(targets) | (
        {k for k in our_state if k.endswith("g_norm.weight")} if not config.elementwise_affine else set()
    )
    assert filled == expected
    grouped = (config.num_kv_heads or config.num_heads) != config.num_heads
    for key, value in fla_state.items():  # plain renames are the same tensor values
        target = fla_key_to_hfx(key)
        if "conv1d" in key or (grouped and any(p in key for p in ("k_proj", "v_proj", "gk_proj.1"))):
            continue
        torch.testing.assert_close(our_state[target], value, rtol=0, atol=0)
    if not config.elementwise_affine:
        assert all(our_state[k].eq(1).all() for k in our_state if k.endswith("g_norm.weight"))


def test_grouped_kv_heads_and_convs_are_exact_copies():
    fla_model = build_fla("gla-conv-relu-clamp-kv")  # 4 heads, 2 kv heads, head_k 16, head_v 32
    state = fla_model.state_dict()
    ours = from_fla(state, fla_model.config).state_dict()
    k = state["model.layers.0.attn.k_proj.weight"].view(2, 16, 64)
    assert torch.equal(ours["model.layers.0.mixer.k_proj.weight"], k.repeat_interleave(2, 0).reshape(64, 64))
    conv = ours["model.layers.1.mixer.conv1d.weight"]
    q_conv, v_conv = state["model.layers.1.attn.q_conv1d.weight"], state["model.layers.1.attn.v_conv1d.weight"]
    assert torch.equal(conv[:64], q_conv)
    assert torch.equal(conv[128:], v_conv.view(2, 32, 1, 3).repeat_interleave(2, 0).reshape(128, 1, 3))


def test_leftover_missing_and_misshapen_tensors_raise_naming_them():
    fla_model = build_fla("gla")
    state = dict(fla_model.state_dict())
    config = fla_model.config
    with pytest.raises(ValueError, match=r"not consumed.*model\.layers\.0\.attn\.extra\.weight"):
        from_fla({**state, "model.layers.0.attn.extra.weight": torch.zeros(2)}, config)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.ffn\.up_proj\.weight'\]"):
        from_fla(missing, config)
    bad = {**state, "model.layers.0.attn.o_proj.weight": torch.zeros(64, 63)}
    with pytest.raises(ValueError, match=r"shape mismatches.*mixer\.o_proj\.weight"):
        from_fla(bad, config)
    our_config = fla_config_to_hfx(config)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        tied = {**config.to_dict(), "tie_word_embeddings": True}
        convert_fla_state_dict(state, tied, fla_config_to_hfx(tied))
    assert (
        convert_fla_state_dict(state, config, our_config).keys()
        == GatedRetentionForCausalLM(our_config).state_dict().keys()
    )


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("retnet", "attn", {"layers": [1], "num_heads": 2}),
        ("gla", "attn", {"layers": [0], "num_heads": 2}),
        ("gla", "attnres_block_size", 2),
        ("retnet", "feature_map", "relu"),
        ("gla", "feature_map", "sigmoid"),
        ("gla", "hidden_act", "powlu"),
        ("retnet", "expand_v", 1.5),
        ("gla", "gate_logit_normalizer", 8),
        ("gla", "share_conv_kernel", True),
    ],
)
def test_unsupported_option_raises_naming_it(family, field, value):
    config = (RetNetConfig if family == "retnet" else GLAConfig)(**TINY).to_dict()
    config[field] = value
    config["use_short_conv"] = field == "share_conv_kernel"  # an older GLA's shared conv matters only with a conv
    with pytest.raises(ValueError, match=f"`{field}="):
        from_fla({}, config)


def test_saved_rotary_table_is_checked_and_consumed():
    fla_model = build_fla("retnet")
    state, config = dict(fla_model.state_dict()), fla_model.config
    head_k = 32  # hidden 64 * expand_k 1.0 / 2 heads
    table = 1.0 / (10000.0 ** (torch.arange(0, head_k, 2, dtype=torch.float32) / head_k))
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        plain = from_fla(state, config)(ids).logits
        with_table = from_fla({**state, "model.layers.1.attn.rotary.inv_freq": table}, config)(ids).logits
    torch.testing.assert_close(with_table, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rotary table"):
        from_fla({**state, "model.layers.1.attn.rotary.inv_freq": table * 2}, config)


def test_unknown_family_and_missing_config_raise():
    with pytest.raises(ValueError, match="model_type 'mamba2'"):
        from_fla({}, {"model_type": "mamba2"})
    with pytest.raises(ValueError, match="`config` is required"):
        from_fla({})


def test_heads_get_the_imported_backbone_and_fresh_heads():
    fla_model = build_fla("retnet")
    state, config = fla_model.state_dict(), fla_model.config
    lm = from_fla(state, config)
    ids = torch.randint(0, 100, (2, 12))
    backbone = from_fla(state, config, head=RetNetModel)
    clf = from_fla(state, config, head="sequence_classification", num_labels=3)
    tok = from_fla(state, config, head=AutoModelForTokenClassification, num_labels=5)
    with torch.no_grad():
        hidden = lm.model(ids).last_hidden_state
        torch.testing.assert_close(backbone(ids).last_hidden_state, hidden, rtol=0, atol=0)
        assert clf(ids).logits.shape == (2, 3) and tok(ids).logits.shape == (2, 12, 5)
    for head in (clf, tok):
        for key, value in lm.model.state_dict().items():
            assert torch.equal(head.model.state_dict()[key], value), key
        assert head.score.weight.abs().max() < 1.0 and head.score.weight.std() > 0  # initialised, not garbage
    bare = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}  # fla's RetNetModel
    assert torch.equal(from_fla(bare, config, head="model")(ids).last_hidden_state, hidden)
    with pytest.raises(ValueError, match=r"missing \['lm_head\.weight'\]"):
        from_fla(bare, config)  # an untied causal LM needs fla's lm_head
    masked = from_fla(state, config, head="masked_lm", bidirectional=True)  # a bidirectional encoder from the LM
    assert masked.config.bidirectional and torch.equal(masked.lm_head.weight, lm.lm_head.weight)
    with pytest.raises(ValueError, match="seq2seq"):
        from_fla(state, config, head="AutoModelForSeq2SeqLM")
    with pytest.raises(ValueError, match="not a head"):
        from_fla(state, config, head="image_classification")


def test_folder_import_and_saved_folder_loads_without_fla_or_hf_extras(tmp_path):
    fla_model = build_fla("gla-conv-relu-clamp-kv")
    fla_model.save_pretrained(tmp_path / "fla")  # safetensors + config.json, as fla-hub folders
    ids = torch.randint(0, 100, (1, 16))
    expected = fla_logits(fla_model, ids)
    ours = from_fla(tmp_path / "fla")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=2e-5)
    ours.save_pretrained(tmp_path / "ours")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    result = run_without_hf_extras(  # a fresh Python: in this one our registered classes would win over remote code
        f"""
        sys.modules["fla"] = None
        from transformers import AutoModelForCausalLM
        ref = torch.load("{tmp_path}/expected.pt")
        model = AutoModelForCausalLM.from_pretrained("{tmp_path}/ours", trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        assert model.config.key_factor == 1.0 and model.config.gate_clamp_min == -0.05
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=1e-5, atol=2e-5)
        print("REMOTE_OK")
        """,
        cwd=str(tmp_path),
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(GLAConfig(**TINY).to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        from_fla(tmp_path)
