"""Gated DeltaNet family: the layer against transformers' Qwen3NextGatedDeltaNet, the converter, family specifics.

The generic checks (every head through the Auto classes, save/load, remote code, generation, PEFT, padding, ...) run
through `tests/families.py` (`gated_deltanet`, `deltanet`)."""

import inspect

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from hf_extras import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GatedDeltaNetForMaskedLM
from hf_extras.convert import gated_deltanet_config_from_qwen3_next, hfx_layer_to_qwen3_next, qwen3_next_layer_to_hfx
from hf_extras.models.modeling_gated_deltanet import GatedDeltaNetMixer

qwen = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


@pytest.fixture(autouse=True)
def qwen_reference_kernels(monkeypatch):
    """transformers' own PyTorch delta-rule functions: with flash-linear-attention installed its decorator swaps in fla's
    Triton kernels (transformers 5.24 does so on CPU too, where they cannot run)."""
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
        monkeypatch.setattr(qwen, name, inspect.unwrap(getattr(qwen, name)))


def tiny_qwen_layer(grouped: bool, dtype=torch.float32, seed=0):
    from transformers import Qwen3NextConfig

    torch.manual_seed(seed)
    config = Qwen3NextConfig(
        vocab_size=64,
        hidden_size=48,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4 if grouped else 2,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    layer = qwen.Qwen3NextGatedDeltaNet(config, layer_idx=0).to(dtype).eval()
    with torch.no_grad():  # away from the init values, so every parameter matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return config, layer


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["auto", "chunkwise", "recurrent"])
def test_layer_matches_qwen3_next(grouped, dtype, mode):
    qwen_config, layer = tiny_qwen_layer(grouped, dtype)
    config = gated_deltanet_config_from_qwen3_next(qwen_config, forward_mode=mode, chunk_size=16)
    ours = GatedDeltaNetMixer(config, 0).to(dtype).eval()
    ours.load_state_dict(qwen3_next_layer_to_hfx(layer.state_dict(), config))
    x = torch.randn(2, 37, qwen_config.hidden_size, dtype=dtype)
    with torch.no_grad():
        ref = layer(x)
        out = ours(x)
    # transformers' kernel computes in float32 whatever the dtype: float32 tolerance for both
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_layer_matches_qwen3_next_left_padded():
    qwen_config, layer = tiny_qwen_layer(grouped=True)
    config = gated_deltanet_config_from_qwen3_next(qwen_config, chunk_size=16)
    ours = GatedDeltaNetMixer(config, 0).eval()
    ours.load_state_dict(qwen3_next_layer_to_hfx(layer.state_dict(), config))
    x = torch.randn(2, 20, qwen_config.hidden_size)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        ref = layer(x, attention_mask=mask)
        out = ours(x, attention_mask=mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_converter_round_trip_and_errors(grouped):
    qwen_config, layer = tiny_qwen_layer(grouped)
    config = gated_deltanet_config_from_qwen3_next(qwen_config)
    assert config.num_heads == config.num_value_heads == qwen_config.linear_num_value_heads
    sd = layer.state_dict()
    back = hfx_layer_to_qwen3_next(qwen3_next_layer_to_hfx(sd, config), config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="missing"):
        qwen3_next_layer_to_hfx({"A_log": sd["A_log"]}, config)
    with pytest.raises(ValueError, match="gate='head'"):
        qwen3_next_layer_to_hfx(sd, gated_deltanet_config_from_qwen3_next(qwen_config, gate="none"))
    with pytest.raises(ValueError, match="in_proj_qkvz has"):
        qwen3_next_layer_to_hfx(sd, gated_deltanet_config_from_qwen3_next(qwen_config, key_head_dim=4))


def tiny(**overrides):
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, num_key_heads=2, chunk_size=8)
    kwargs.update(overrides)
    return GatedDeltaNetConfig(**kwargs)


def test_config_validation():
    with pytest.raises(Exception, match="num_key_heads"):
        tiny(num_key_heads=3)
    with pytest.raises(Exception, match="conv_size"):
        tiny(conv_size=1)
    config = tiny(value_head_dim=16)
    assert config.key_head_dim == 8 and config.value_head_dim == 16 and config.num_value_heads == 4
    # explicit head widths: the width need not divide by the heads (fla's 6-head, 2048-wide models), except where a
    # width derives from it (the default key_head_dim; hybrid attention layers)
    assert tiny(num_heads=6, num_key_heads=3, key_head_dim=8).value_head_dim == 8
    with pytest.raises(StrictDataclassError, match="set `key_head_dim`"):
        tiny(num_heads=6, num_key_heads=3)
    with pytest.raises(Exception, match="divisible by `num_heads`"):
        tiny(num_heads=6, num_key_heads=3, key_head_dim=8, layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ValueError, match="allow_neg_eigval=False"):  # Qwen3-Next's layer has neither fla option
        qwen3_next_layer_to_hfx({}, tiny(allow_neg_eigval=True, conv_size=4))


@pytest.mark.parametrize("gate", ["head", "none"])
def test_forms_agree_in_the_model(gate):
    """Whole model: parallel, chunkwise and recurrent forms give the same logits (causal and bidirectional)."""
    ids = torch.randint(3, 96, (2, 29))
    for cls, bidirectional in ((GatedDeltaNetForCausalLM, False), (GatedDeltaNetForMaskedLM, True)):
        torch.manual_seed(0)
        model = cls(tiny(gate=gate, bidirectional=bidirectional, value_head_dim=12)).eval()
        logits = {}
        for mode in ("parallel", "chunkwise", "recurrent"):
            for layer in model.model.layers:
                layer.mixer.forward_mode = mode
            with torch.no_grad():
                logits[mode] = model(ids).logits
        torch.testing.assert_close(logits["chunkwise"], logits["recurrent"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits["parallel"], logits["recurrent"], rtol=1e-5, atol=1e-5)


def test_pads_leave_the_state_alone():
    """Interior pads (k = v = 0, log decay 0, conv input zeroed) in a bidirectional model change no real token's
    output: the row without the pads gives the same numbers."""
    torch.manual_seed(0)
    model = GatedDeltaNetForMaskedLM(tiny(bidirectional=True, use_short_conv=False)).eval()
    ids = torch.randint(3, 96, (1, 20))
    padded = torch.cat([ids[:, :7], torch.zeros(1, 4, dtype=torch.long), ids[:, 7:]], dim=1)
    mask = torch.ones_like(padded)
    mask[:, 7:11] = 0
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, mask[0].bool()], ref, rtol=1e-5, atol=1e-5)


def test_init_on_load_and_decay_range(tmp_path):
    """A_log / dt_bias are custom parameters: set at init (decays in (0, 1)), kept by save/load."""
    model = GatedDeltaNetForCausalLM(tiny())
    mixer = model.model.layers[0].mixer
    assert torch.isfinite(mixer.A_log).all() and (mixer.A_log.exp() >= 1).all() and (mixer.A_log.exp() <= 16).all()
    log_a = mixer.log_decay(torch.randn(1, 5, 32))
    assert (log_a < 0).all() and (log_a > -16).all()
    model.save_pretrained(tmp_path)
    loaded = GatedDeltaNetForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].mixer.A_log, mixer.A_log)
    assert torch.equal(loaded.model.layers[0].mixer.dt_bias, mixer.dt_bias)


def test_cli_trains_gated_deltanet(tmp_path):
    """`hf-extras train ... --model_type hfx_gated_deltanet`: a run folder whose model (and remote code, kernel
    included) loads through the Auto classes and names the family in its card."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hf_extras.cli import main

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = tmp_path / "run"
    args = [
        "--model_type", "hfx_gated_deltanet", "--max_steps", "2", "--hidden_size", "32", "--num_hidden_layers", "1",
        "--num_heads", "2", "--block_size", "32", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_steps", "2",
        "--warmup_steps", "1", "--sample_max_new_tokens", "4", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(["train", str(quickstart), *args, f"--output_dir={out}"]) == 0
    for name in ("modeling_gated_deltanet.py", "configuration_gated_deltanet.py", "delta_ops.py"):
        assert (out / name).is_file(), name
    assert "Gated DeltaNet" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GatedDeltaNetForCausalLM"


@pytest.mark.parametrize("gate", ["head", "none"])
@pytest.mark.parametrize("mode", ["chunkwise", "parallel", "recurrent"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_documents_equal_documents_alone(gate, mode, bidirectional):
    """A row of documents packed with position ids restarting at 0: each document's logits are those it has alone
    (state and conv window reset at its first token, both directions), and the parameter gradients of the packed
    row equal the sum over the documents run one by one."""
    torch.manual_seed(0)
    cls = GatedDeltaNetForMaskedLM if bidirectional else GatedDeltaNetForCausalLM
    model = cls(tiny(gate=gate, bidirectional=bidirectional, forward_mode=mode)).float()
    lengths = [11, 3, 17, 6]
    docs = [torch.randint(3, 96, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    out = model(packed, position_ids=position_ids).logits
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    start = 0
    for doc, n in zip(docs, lengths):
        alone = model(doc).logits
        torch.testing.assert_close(out[:, start : start + n], alone, rtol=1e-5, atol=1e-5)
        (alone * weights[:, start : start + n]).sum().backward()
        start += n
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_packed_prefill_then_decode_continues_the_last_document():
    """Generation after a packed prompt continues its last document alone (state and conv tail reset)."""
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(tiny()).eval()
    first, last = torch.randint(3, 96, (1, 9)), torch.randint(3, 96, (1, 6))
    packed = torch.cat([first, last], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, use_cache=True)
        step = model(torch.tensor([[5]]), position_ids=torch.tensor([[6]]), cache=out.cache, use_cache=True).logits
        ref = model(torch.cat([last, torch.tensor([[5]])], dim=1)).logits[:, -1:]
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)


class FakeFlaDelta:
    """`fla.ops.gated_delta_rule`'s two kernels with fla's documented conventions (time-first `(B, T, H, D)`, `g` and
    `beta` `(B, T, H)`, log-space `g`, `scale` on q, `(B, H, K, V)` states) on top of our reference kernel."""

    def __init__(self):
        self.calls = []

    def _run(self, name, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        from hf_extras.models.delta_ops import gated_delta_rule

        assert q.shape == k.shape and q.shape[:3] == v.shape[:3] and g.shape == beta.shape == q.shape[:3]
        assert not use_qk_l2norm_in_kernel and torch.isfinite(g).all()  # boundaries arrive finite
        self.calls.append(name)
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        o, state = gated_delta_rule(
            t(q), t(k), t(v), t(beta), t(g), mode="recurrent", scale=scale, initial_state=initial_state,
            output_final_state=output_final_state,
        )  # fmt: skip
        return t(o), state

    def chunk(self, q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, **kwargs):
        return self._run("chunk", q, k, v, g, beta, scale, initial_state, output_final_state, **kwargs)

    def fused_recurrent(
        self, q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, **kw
    ):
        return self._run("recurrent", q, k, v, g, beta, scale, initial_state, output_final_state, **kw)


@pytest.fixture
def fake_fla_delta(monkeypatch):
    import sys
    import types

    from hf_extras.models import fla_delta_dispatch

    fake = FakeFlaDelta()
    modules = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule")}
    modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = fake.chunk
    modules["fla.ops.gated_delta_rule"].fused_recurrent_gated_delta_rule = fake.fused_recurrent
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fla_delta_dispatch, "DISPATCH_DEVICE_TYPES", ("cpu",))  # the stand-in runs on CPU tensors
    monkeypatch.setattr(fla_delta_dispatch, "_KERNELS", {})
    monkeypatch.delenv("HF_EXTRAS_FLA", raising=False)
    return fake


@pytest.mark.parametrize("gate", ["head", "none"])
def test_fla_dispatch_mapping_with_a_stand_in(fake_fla_delta, gate, monkeypatch):
    """The model through the fla dispatch (a stand-in with fla's conventions) gives the PyTorch forms' logits,
    packed documents included; prefill goes to the chunk kernel, decoding to the fused recurrent one; bidirectional
    passes and HF_EXTRAS_FLA=0 stay in PyTorch."""
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(tiny(gate=gate)).eval()
    ids = torch.randint(3, 96, (2, 21))
    position_ids = torch.cat([torch.arange(8), torch.arange(13)])[None]
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=True)
        model(ids[:, :1], position_ids=torch.tensor([[13]]), cache=out.cache)
    assert fake_fla_delta.calls == ["chunk"] * 2 + ["recurrent"] * 2  # two layers
    monkeypatch.setenv("HF_EXTRAS_FLA", "0")
    with torch.no_grad():
        ref = model(ids, position_ids=position_ids).logits
    assert len(fake_fla_delta.calls) == 4
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    # with gradients even a one-token step goes to the chunk kernel (fla's fused recurrent one has no backward)
    from hf_extras.models.fla_delta_dispatch import fla_gated_delta_rule

    monkeypatch.delenv("HF_EXTRAS_FLA", raising=False)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 2, 1, 8), dim=-1) for _ in range(2))
    v, beta = torch.randn(1, 2, 1, 8, requires_grad=True), torch.rand(1, 2, 1)
    fla_gated_delta_rule(q, k, v, beta, None, mode="recurrent")[0].sum().backward()
    with torch.no_grad():
        fla_gated_delta_rule(q, k, v, beta, None, mode="recurrent")
    assert fake_fla_delta.calls[4:] == ["chunk", "recurrent"] and v.grad is not None
    fake_fla_delta.calls = fake_fla_delta.calls[:4]
    monkeypatch.delenv("HF_EXTRAS_FLA", raising=False)
    masked = GatedDeltaNetForMaskedLM(tiny(gate=gate, bidirectional=True)).eval()
    with torch.no_grad():
        masked(ids)
    assert len(fake_fla_delta.calls) == 4


def test_data_collator_with_flattening_loss_equals_padded_batch():
    """transformers' padding-free batches (`DataCollatorWithFlattening`: one row, position ids restarting at 0,
    -100 at each document's first label) give the loss of the right-padded batch of the same documents."""
    from transformers import DataCollatorWithFlattening

    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(tiny()).eval()
    docs = [torch.randint(3, 96, (n,)).tolist() for n in (7, 12, 4)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    width = max(map(len, docs))
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, d in enumerate(docs):
        ids[i, : len(d)], mask[i, : len(d)] = torch.tensor(d), 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss_packed = model(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"]).loss
        loss_padded = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
