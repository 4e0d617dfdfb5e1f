"""Mamba-2 (SSD): the mixer against an explicit SSM recurrence, forms and gradients, padding, init, transformers
interop (conversion both ways), CLI.

The generic tests (heads, generation, save/load, remote code, bad input, PEFT) run on it through `families.FAMILIES`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import assert_finite_in_float32_and_bf16
from test_fla_dispatch import fake_fla  # noqa: F401  (the stand-in fla, a fixture)
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from hf_extras import (
    HfxMamba2Config,
    HfxMamba2ForCausalLM,
    HfxMamba2ForMaskedLM,
    HfxMamba2ForSequenceClassification,
    RecurrentCache,
)
from hf_extras.convert import (
    export_to_transformers_mamba2,
    hfx_config_from_mamba2,
    hfx_state_dict_to_mamba2,
    import_transformers_mamba2,
    mamba2_config_from_hfx,
    mamba2_state_dict_to_hfx,
)
from hf_extras.models.modeling_mamba2 import HfxMamba2Mixer

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, n_groups=2, state_size=8, chunk_size=8)
MODES = ("parallel", "chunkwise", "recurrent")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def mixer(seed=0, **overrides) -> HfxMamba2Mixer:
    torch.manual_seed(seed)
    config = HfxMamba2Config(**{**TINY, **overrides})
    module = HfxMamba2Mixer(config, 0)
    module.init_custom_weights(config)
    with torch.no_grad():  # make every parameter matter (D, the norm weight, the conv bias are 1 / 0 at init)
        module.D.uniform_(0.5, 1.5)
        module.norm.weight.uniform_(0.5, 1.5)
        module.conv1d.bias.normal_(0, 0.1)
        module.A_log.uniform_(-1.0, 1.5)  # decays from mild to strong
    return module


def set_mode(module, mode):
    for m in module.modules():
        if isinstance(m, HfxMamba2Mixer):
            m.forward_mode = mode


def reference_mamba2(m: HfxMamba2Mixer, hidden, state=None):
    """Mamba-2 written out as the paper's SSM, token by token (no linear-attention rewrite): the independent oracle.

    Returns (output, final state `(B, H, P, N)` as transformers stores it)."""
    batch, seq_len, _ = hidden.shape
    H, P, N, G = m.num_heads, m.head_dim, m.ssm_state_size, m.n_groups
    z, xBC, dt = m.in_proj(hidden).split([m.intermediate_size, m.conv_dim, H], dim=-1)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.conv_kernel_size - 1, groups=m.conv_dim)[..., :seq_len]).transpose(1, 2)  # fmt: skip
    x, B, C = xBC.split([m.intermediate_size, G * N, G * N], dim=-1)
    x = x.view(batch, seq_len, H, P)
    B = B.view(batch, seq_len, G, N).repeat_interleave(H // G, dim=2)
    C = C.view(batch, seq_len, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.time_step_limit)  # (batch, time, H)
    A = -torch.exp(m.A_log)
    h = torch.zeros(batch, H, P, N) if state is None else state
    ys = []
    for t in range(seq_len):
        dA = torch.exp(dt[:, t] * A)[..., None, None]
        h = dA * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + m.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(batch, seq_len, -1)
    y = m.norm(y, z)
    return m.out_proj(y), h


# ----------------------------------------------------------------------------------------------------------------
# the mixer: SSD == the SSM, forms, gradients, states
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_groups", [1, 2, 4])
@pytest.mark.parametrize("mode", MODES)
def test_mixer_equals_the_explicit_ssm_recurrence(n_groups, mode):
    m = mixer(n_groups=n_groups, time_step_limit=[0.0, 0.5])
    m.forward_mode = mode
    hidden = torch.randn(2, 37, 32)  # odd length: several chunks and a partial one
    with torch.no_grad():
        expected, _ = reference_mamba2(m, hidden)
        got = m(hidden)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 7, 37])
def test_forms_and_gradients_agree(bidirectional, n_groups, seq_len):
    m = mixer(n_groups=n_groups, bidirectional=bidirectional)
    hidden = torch.randn(2, seq_len, 32)
    outs, grads = {}, {}
    for mode in MODES:
        m.forward_mode = mode
        m.zero_grad()
        x = hidden.clone().requires_grad_()
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[mode] = out.detach()
        grads[mode] = [x.grad] + [p.grad.clone() for p in m.parameters()]
    for mode in ("parallel", "chunkwise"):
        assert rel_err(outs[mode], outs["recurrent"]) <= 1e-5, mode
        for g, ref in zip(grads[mode], grads["recurrent"]):
            assert rel_err(g, ref) <= 1e-5, mode
    if seq_len > 1:  # every parameter is reached (one token from a zero state never meets the decay A)
        assert all(g.abs().sum() > 0 for g in grads["recurrent"])


@pytest.mark.parametrize("use_bias", [False, True])
def test_in_proj_split_into_two_gemms_equals_the_module_call(use_bias):
    """Without a cache and with a plain `nn.Linear` in_proj, z and (xBC, dt) are two GEMMs on slices of its weight
    (no z copy, no dz copy); a hooked in_proj (as accelerate, DeepSpeed, PEFT and quantizers leave it) is called as a
    module. Both: the same outputs and gradients."""
    m = mixer(use_bias=use_bias)
    hidden = torch.randn(2, 37, 32)
    weights = torch.linspace(-1, 1, 2 * 37 * 32).view(2, 37, 32)
    calls, results = [], []
    for hooked in (False, True):
        handle = m.in_proj.register_forward_hook(lambda *_: calls.append(1)) if hooked else None
        m.zero_grad()
        x = hidden.clone().requires_grad_()
        out = m(x)
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in m.parameters()])
        if handle is not None:
            handle.remove()
    assert calls == [1]  # the split path never called the module
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_initial_state_continues_the_sequence(n_groups, mode):
    """Prefill 13 tokens into a cache, continue 24 more in each form: the outputs of one 37-token pass, and the
    final SSM state of the explicit recurrence (transposed: ours is `(B, H, N, P)`)."""
    m = mixer(n_groups=n_groups)
    hidden = torch.randn(2, 37, 32)
    with torch.no_grad():
        full, ref_state = reference_mamba2(m, hidden)
        cache = RecurrentCache(num_layers=1)
        m.forward_mode = "chunkwise"
        first = m(hidden[:, :13], cache=cache)
        m.forward_mode = mode
        second = m(hidden[:, 13:], cache=cache)
    assert rel_err(torch.cat([first, second], 1), full) <= 1e-5
    assert rel_err(cache.read_recurrent(0).transpose(-1, -2), ref_state) <= 1e-5


class DictCache:
    """The mixer's cache interface over plain tensors (no in-place copies), so gradients reach the initial state."""

    def __init__(self, state, tail):
        self.state, self.tail = state, tail

    def read_recurrent(self, layer_idx):
        return self.state

    def write_recurrent(self, layer_idx, state):
        self.state = state

    def read_conv(self, layer_idx):
        return self.tail

    def write_conv(self, layer_idx, tail, kernel_size):
        self.tail = tail


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_initial_state_gradients_agree_across_forms(bidirectional):
    m = mixer(bidirectional=bidirectional)
    state0, tail0 = torch.randn(2, 4, 8, 16), torch.randn(2, m.conv_dim, 3)
    hidden = torch.randn(2, 21, 32)
    results = {}
    for mode in MODES:
        m.forward_mode = mode
        m.zero_grad()
        s, t = state0.clone().requires_grad_(), tail0.clone().requires_grad_()
        cache = DictCache(s, t)
        out = m(hidden, cache=cache)
        (out.square().sum() + cache.state.square().sum()).backward()
        results[mode] = [out.detach(), cache.state.detach(), s.grad, t.grad, m.A_log.grad.clone(), m.dt_bias.grad]
    for mode in ("parallel", "chunkwise"):
        for got, ref in zip(results[mode], results["recurrent"]):
            assert rel_err(got, ref) <= 1e-5, mode


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("mode", MODES)
def test_pad_contents_never_matter_and_left_right_pads_change_nothing(bidirectional, mode):
    """Pads get dt = 0 and a zero conv input: whatever a pad holds, the real tokens' outputs are those of the row with
    zeros there; left and right pads change nothing at all. (An interior pad still occupies a slot of the next
    tokens' conv window, as in Mamba-1 and transformers: it reads as zeros, not as the tokens before it.)"""
    m = mixer(bidirectional=bidirectional)
    m.forward_mode = mode
    real = torch.randn(1, 20, 32)
    # pads: 3 left, 2 after real token 8, 4 right
    keep = torch.tensor([0] * 3 + [1] * 8 + [0] * 2 + [1] * 12 + [0] * 4)
    padded = torch.randn(1, keep.numel(), 32) * 5  # garbage at pads
    padded[:, keep.bool()] = real
    with torch.no_grad():
        alone = m(real)
        together = m(padded, attention_mask=keep[None])
    # interior pads cut the conv window: compare against the row whose conv also sees zeros there
    inner = torch.cat([real[:, :8], torch.zeros(1, 2, 32), real[:, 8:]], 1)
    with torch.no_grad():
        ref = m(inner, attention_mask=torch.tensor([[1] * 8 + [0] * 2 + [1] * 12]))
    assert rel_err(together[:, keep.bool()], ref[:, torch.tensor([1] * 8 + [0] * 2 + [1] * 12).bool()]) <= 1e-5
    # left and right pads alone change nothing at all
    lr = torch.cat([torch.randn(1, 3, 32), real, torch.randn(1, 4, 32)], 1)
    lr_mask = torch.tensor([[0] * 3 + [1] * 20 + [0] * 4])
    with torch.no_grad():
        assert rel_err(m(lr, attention_mask=lr_mask)[:, 3:23], alone) <= 1e-5


def test_pads_do_not_touch_the_state():
    """dt = 0 at pads: a right-padded prefill leaves the same SSM and conv state as the unpadded one (transformers'
    Mamba2 zeroes x, B and C there but still decays the state)."""
    m = mixer()
    hidden = torch.randn(1, 11, 32)
    padded = torch.cat([hidden, torch.randn(1, 5, 32)], 1)
    with torch.no_grad():
        a, b = RecurrentCache(num_layers=1), RecurrentCache(num_layers=1)
        m(hidden, cache=a)
        m(padded, attention_mask=torch.tensor([[1] * 11 + [0] * 5]), cache=b)
    assert rel_err(b.read_recurrent(0), a.read_recurrent(0)) <= 1e-6


def test_right_padded_prefill_continued_by_decoding_equals_the_unpadded_one():
    torch.manual_seed(0)
    model = HfxMamba2ForCausalLM(HfxMamba2Config(**TINY)).eval()
    ids = torch.randint(3, 96, (1, 15))
    more = torch.randint(3, 96, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 15 + [0] * 4])
    with torch.no_grad():
        ref = model(torch.cat([ids, more], 1)).logits[:, 15:]
        out = model(padded, attention_mask=mask, use_cache=True)
        cache, steps = out.cache, []
        for t in range(6):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            steps.append(model(more[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True).logits)
    assert rel_err(torch.cat(steps, 1), ref) <= 1e-5


def test_masked_lm_sees_both_directions_and_classifier_trains():
    torch.manual_seed(0)
    mlm = HfxMamba2ForMaskedLM(HfxMamba2Config(**TINY, bidirectional=True)).eval()
    ids = torch.randint(3, 96, (1, 12))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 96
    with torch.no_grad():
        assert not torch.allclose(mlm(ids).logits[0, 2], mlm(changed).logits[0, 2])  # a later token reaches token 2
    clf = HfxMamba2ForSequenceClassification(HfxMamba2Config(**TINY, bidirectional=True, num_labels=3))
    logits32, logits16 = assert_finite_in_float32_and_bf16(HfxMamba2ForCausalLM(HfxMamba2Config(**TINY)), ids)
    assert rel_err(logits16, logits32) < 0.1
    out = clf(ids, labels=torch.tensor([2]))
    out.loss.backward()
    assert clf.model.layers[0].mixer.A_log.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# config and initialisation
# ----------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    config = HfxMamba2Config()
    assert (config.model_type, config.ffn_type, config.residual_in_fp32, config.n_groups) == (
        "hfx_mamba2",
        "none",
        True,
        1,
    )
    assert config.head_dim == 2 * 256 // 8
    for bad, field in (
        (dict(n_groups=3), "n_groups"),
        (dict(num_heads=4, expand=3, hidden_size=30), "num_heads"),
        (dict(state_size=0), "state_size"),
        (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
        (dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
    ):
        with pytest.raises(Exception, match=field):
            HfxMamba2Config(**{**TINY, **bad})


def test_init_weights_sets_every_custom_parameter_on_load(tmp_path):
    """The init trap: `from_pretrained` runs `_init_weights` only on what the checkpoint lacks; A_log, D and dt_bias
    missing from the file must come back initialised as transformers does, not as uninitialised memory."""
    from safetensors.torch import load_file, save_file

    config = HfxMamba2Config(**TINY, time_step_min=0.01, time_step_max=0.05)
    HfxMamba2ForCausalLM(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = [k for k in state if k.endswith(("A_log", ".D", "dt_bias"))]
    assert len(dropped) == 3 * config.num_hidden_layers
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model.safetensors", {"format": "pt"})
    model = HfxMamba2ForCausalLM.from_pretrained(tmp_path)
    loaded = model.state_dict()
    for key, value in state.items():  # what the file has is kept (the mixer's init hook must not overwrite it)
        if key not in dropped:
            assert torch.equal(loaded[key], value), key
    for layer in model.model.layers:
        mx = layer.mixer
        torch.testing.assert_close(mx.A_log, torch.log(torch.arange(1.0, 5.0)))
        torch.testing.assert_close(mx.D, torch.ones(4))
        dt = F.softplus(mx.dt_bias)
        assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()


# ----------------------------------------------------------------------------------------------------------------
# transformers interop
# ----------------------------------------------------------------------------------------------------------------


def hf_mamba2(seed=0, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=2, state_size=8,
        chunk_size=16, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    kwargs.update(overrides)
    model = Mamba2ForCausalLM(Mamba2Config(**kwargs)).eval()
    with torch.no_grad():  # away from the init values, so a swapped or dropped parameter shows
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", "conv1d.bias")):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("use_bias, use_conv_bias", [(False, True), (True, False)])
def test_mixer_parameters_match_transformers(use_bias, use_conv_bias):
    ours = HfxMamba2Mixer(HfxMamba2Config(**TINY, use_bias=use_bias, use_conv_bias=use_conv_bias), 0)
    theirs = Mamba2Mixer(
        Mamba2Config(
            hidden_size=32,
            num_heads=4,
            head_dim=16,
            n_groups=2,
            state_size=8,
            num_hidden_layers=2,
            use_bias=use_bias,
            use_conv_bias=use_conv_bias,
        ),  # fmt: skip
        0,
    )
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(n_groups=1, use_bias=True, use_conv_bias=False, residual_in_fp32=False),
        dict(tie_word_embeddings=True, n_groups=4, num_heads=8, head_dim=8, conv_kernel=3, expand=2),
        dict(time_step_limit=(0.01, 0.08), state_size=4, layer_norm_epsilon=1e-3),
    ],
    ids=["default", "one-group-biases", "tied-heads8", "dt-limit"],
)
def test_import_gives_transformers_logits(overrides):
    hf = hf_mamba2(**overrides)
    ours = import_transformers_mamba2(hf)
    assert type(ours) is HfxMamba2ForCausalLM and not ours.training
    ids = torch.randint(3, 96, (2, 45))
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        for mode in MODES:
            set_mode(ours, mode)
            assert rel_err(ours(ids).logits, expected) <= 1e-5, mode


def test_import_greedy_generation_matches_transformers():
    hf = hf_mamba2(seed=3)
    ours = import_transformers_mamba2(hf)
    ids = torch.randint(3, 96, (2, 21))
    kwargs = dict(max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        theirs = hf.generate(ids, **kwargs)
        mine = ours.generate(ids, **kwargs)
    assert torch.equal(mine, theirs)


def test_export_round_trip_is_exact():
    hf = hf_mamba2(n_groups=1, time_step_limit=(0.0, 0.3))
    back = export_to_transformers_mamba2(import_transformers_mamba2(hf))
    assert type(back) is Mamba2ForCausalLM
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("num_heads", "head_dim", "n_groups", "state_size", "layer_norm_epsilon", "tie_word_embeddings"):
        assert getattr(back.config, name) == getattr(hf.config, name), name
    assert tuple(back.config.time_step_limit) == (0.0, 0.3)
    ids = torch.randint(3, 96, (1, 19))
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) <= 1e-5  # chunk_size is not exported: rounding only


def test_state_dict_key_map_both_ways_and_errors():
    hf = hf_mamba2()
    state = mamba2_state_dict_to_hfx(hf.state_dict())
    assert "model.layers.1.mixer.norm.weight" in state and "model.layers.0.mixer_norm.weight" in state
    assert hfx_state_dict_to_mamba2(state).keys() == hf.state_dict().keys()
    bare = {k.removeprefix("backbone."): v for k, v in hf.state_dict().items() if k.startswith("backbone.")}
    assert set(mamba2_state_dict_to_hfx(bare)) == set(state) - {"lm_head.weight"}
    with pytest.raises(KeyError, match="x_proj"):
        mamba2_state_dict_to_hfx({"backbone.layers.0.mixer.x_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model_type"):
        hfx_config_from_mamba2({"model_type": "mamba"})
    with pytest.raises(ValueError, match="ffn_type"):
        mamba2_config_from_hfx(HfxMamba2Config(**{**TINY, "ffn_type": "glu"}))
    for option in (dict(D_has_hdim=True), dict(output_norm=False), dict(norm_before_gate=True)):  # mamba_ssm's only
        with pytest.raises(ValueError, match=f"no option for {{'{next(iter(option))}'"):
            mamba2_config_from_hfx(HfxMamba2Config(**TINY, **option))
    config = hfx_config_from_mamba2(hf.config, chunk_size=32)
    assert (config.chunk_size, config.head_dim, config.norm_eps) == (32, 16, 1e-5)


def test_imported_checkpoint_gets_a_classification_head(tmp_path):
    ours = import_transformers_mamba2(hf_mamba2())
    ours.save_pretrained(tmp_path)
    clf = HfxMamba2ForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    torch.testing.assert_close(clf.model.layers[1].mixer.A_log, ours.model.layers[1].mixer.A_log)
    out = clf(torch.randint(3, 96, (2, 9)), labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss)


def test_cli_trains_hfx_mamba2(tmp_path):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hf_extras.cli import main

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = tmp_path / "run"
    args = [
        "--model_type", "hfx_mamba2", "--max_steps", "2", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_heads", "4", "--n_groups", "2", "--state_size", "8", "--block_size", "32",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--eval_steps", "2", "--warmup_steps", "1",
        "--sample_max_new_tokens", "4", "--disable_tqdm", "true", f"--output_dir={out}",
    ]  # fmt: skip
    assert main(["train", str(quickstart), *args]) == 0
    assert (out / "modeling_mamba2.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "HfxMamba2ForCausalLM" and model.config.n_groups == 2


@pytest.mark.parametrize("mode", ["chunkwise", "parallel"])
def test_causal_lm_traces_as_one_graph(mode):
    """No graph break anywhere in a training step (the SSD scan is `retention_ops`, which compiles fullgraph)."""
    from families import FAMILIES
    from test_compile import _compare, _model_loss_fn

    family = next(f for f in FAMILIES if f.name == "mamba2")
    loss, inputs, _ = _model_loss_fn(family, forward_mode=mode)
    _compare(loss, inputs, "aot_eager", fullgraph=True, rtol=1e-4)


def test_fla_dispatch_gets_the_per_head_decay_and_matches(fake_fla, monkeypatch):  # noqa: F811
    """On CUDA with flash-linear-attention, the SSD scan goes to `chunk_simple_gla` with `g = dt * A` `(B, T, H)`;
    checked on CPU against fla's documented conventions (the stand-in of `test_fla_dispatch`)."""
    fake = fake_fla
    torch.manual_seed(0)
    model = HfxMamba2ForCausalLM(HfxMamba2Config(**TINY, forward_mode="chunkwise")).eval()
    ids = torch.randint(3, 96, (2, 33))
    with torch.no_grad():
        monkeypatch.setenv("HF_EXTRAS_FLA", "0")
        expected = model(ids).logits
        monkeypatch.delenv("HF_EXTRAS_FLA")
        got = model(ids).logits
    assert [name for name, _ in fake.calls] == ["simple_gla"] * 2
    assert fake.calls[0][1] == dict(shape=(2, 33, 4, 8), g=(2, 33, 4), g_gamma=False, scale=1.0)
    assert rel_err(got, expected) <= 1e-5


def test_bench_rows_build_the_same_model_twice():
    """`hf-extras bench --models hfx_mamba2 hf_mamba2`: ours and transformers' Mamba-2 of one config (same size)."""
    from hf_extras.bench import models as benchmark

    dims = benchmark.Dims()
    with torch.device("meta"):
        ours, theirs = (benchmark.MODELS[name].build(dims) for name in ("hfx_mamba2", "hf_mamba2"))
    assert type(theirs) is Mamba2ForCausalLM and type(ours) is HfxMamba2ForCausalLM
    assert benchmark.count_parameters(ours) == benchmark.count_parameters(theirs)
    assert (ours.config.num_heads, ours.config.head_dim, ours.config.state_size) == (8, 64, 128)
