"""Mixed precision on CPU: bf16 autocast training of every family, `hf-extras train --bf16 true`, and the kernels
keeping their decays in float32 under float16 autocast (what fp16 training on a GPU relies on; CPU autocast
supports float16 too, so the dtype of every decay op is checked here at the aten level)."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from test_cli import QUICKSTART, TINY
from test_mlp_mixer import VOCAB, text_config
from torch.utils._python_dispatch import TorchDispatchMode

import hf_extras
from hf_extras.models.retention_ops import chunkwise_retention, decayed_linear_attention
from hf_extras.models.scan_ops import selective_scan


def _loss_and_grads(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_bf16_autocast_training_every_family(family):
    model = family.cls("ForCausalLM")(family.config(chunk_size=8)).train()
    ids = torch.randint(3, 96, (2, 40))  # longer than a chunk: the chunkwise forms run
    reference, _ = _loss_and_grads(model, ids, autocast=False)
    loss, grads = _loss_and_grads(model, ids, autocast=True)
    assert torch.isfinite(loss)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)


def test_bf16_autocast_training_mlp_mixer_text():
    model = hf_extras.MlpMixerForCausalLM(text_config()).train()
    ids = torch.randint(3, VOCAB, (2, 12))
    reference, _ = _loss_and_grads(model, ids, autocast=False)
    loss, grads = _loss_and_grads(model, ids, autocast=True)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)


def test_hf_extras_train_bf16_on_cpu(tmp_path):
    import json

    from hf_extras.cli import main

    out = tmp_path / "run"
    assert (
        main(["train", str(QUICKSTART), *TINY, "--bf16", "true", "--eval_strategy", "no", f"--output_dir={out}"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval_loss"] == pytest.approx(metrics["final_eval_loss"])  # not NaN
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    assert "bf16" in (out / "README.md").read_text()


class _DecayOps(TorchDispatchMode):
    """Records the input dtype of every exp / exp2 / cumsum (where decays are formed) actually dispatched."""

    OPS = ("exp", "exp_", "exp2", "exp2_", "expm1", "cumsum")

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS and args[0].dtype.is_floating_point:  # not integer counters
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _qkv(B=1, H=2, T=200, D=16, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(B, H, T, D, generator=gen) * 0.3).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("decay", ["fixed", "head", "key"])
@pytest.mark.parametrize("mode", ["chunkwise", "parallel"])
def test_retention_decays_stay_float32_under_fp16_autocast(decay, mode):
    q, k, v = _qkv()
    B, H, T, D = q.shape
    # slow decays over a long span: a float16 cumulative sum of -1e-3 steps would stall and drift
    log_decay = {
        "fixed": torch.full((H,), -1e-3),
        "head": -torch.rand(B, H, T) * 2e-3,
        "key": -torch.rand(B, H, T, D) * 2e-3,
    }[decay]
    recorder = _DecayOps()
    with torch.autocast("cpu", dtype=torch.float16), recorder:
        out, state = decayed_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=32, output_final_state=True)
    assert recorder.dtypes and set(recorder.dtypes) == {torch.float32}
    assert state.dtype == torch.float32 and out.dtype == torch.float16
    ref, ref_state = chunkwise_retention(
        *(t.double() for t in (q, k, v)), log_decay.double(), chunk_size=32, output_final_state=True
    )
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state.double(), ref_state, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["chunkwise", "parallel"])
def test_selective_scan_decays_stay_float32_under_fp16_autocast(mode):
    gen = torch.Generator().manual_seed(0)
    batch, T, Dm, N = 1, 160, 8, 4
    x = torch.randn(batch, T, Dm, generator=gen).half()
    dt = (torch.rand(batch, T, Dm, generator=gen) * 1e-2).half()
    A = -torch.rand(Dm, N, generator=gen) - 0.1
    Bm, C = (torch.randn(batch, T, N, generator=gen).half() for _ in range(2))
    recorder = _DecayOps()
    with torch.autocast("cpu", dtype=torch.float16), recorder:
        y, state = selective_scan(x, dt, A, Bm, C, mode=mode, chunk_size=32, output_final_state=True)
    assert recorder.dtypes and set(recorder.dtypes) == {torch.float32}
    assert state.dtype == torch.float32
    ref, ref_state = selective_scan(*(t.double() for t in (x, dt, A, Bm, C)), mode="recurrent", output_final_state=True)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state.double(), ref_state, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_mixers_form_decays_in_float32_under_fp16_autocast(family):
    """The whole model under float16 autocast: the gates' log-sigmoid / softplus and every decay op run in float32."""
    model = family.cls("ForCausalLM")(family.config(chunk_size=8)).eval()
    ids = torch.randint(3, 96, (1, 24))
    recorder = _DecayOps()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), recorder:
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    if family.recurrent:
        assert set(recorder.dtypes) <= {torch.float32}
        assert recorder.dtypes or family.name == "deltanet"  # DeltaNet forms no decay at all
