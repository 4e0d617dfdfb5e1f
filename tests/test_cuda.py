"""CUDA checks (skipped without a GPU; run by `scripts/gpu_check.sh`).

* flash-linear-attention's kernels (through `hf_extras.models.fla_dispatch`) against our chunkwise form on the GPU:
  outputs, final states and gradients, every decay kind, float32 and bf16 (skipped without `fla`);
* every family's forward, backward and generation on CUDA in float32 (matching the CPU numbers) and bf16 (finite,
  close to float32), with and without the fla dispatch.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES

from hf_extras.models import fla_dispatch
from hf_extras.models.retention_ops import chunkwise_retention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
# relative error by norm, ||a - b|| / ||b||: Triton's float32 dots run in TF32 (~1e-3 per product)
REL = {torch.float32: 1e-2, torch.bfloat16: 5e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    error = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
    assert error < tol, f"{what}: relative error {error:.2e} >= {tol}"


@pytest.fixture
def fla():
    module = pytest.importorskip("fla")
    fla_dispatch._KERNELS.clear()
    assert fla_dispatch._kernels() is not None, "fla is installed but its kernels did not import"
    return module


def _inputs(decay: str, dtype, B=2, H=4, T=1000, D=64, with_state=True):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (
        (torch.randn(B, H, T, D, device=CUDA, generator=gen) * D**-0.5).to(dtype).requires_grad_() for _ in range(3)
    )
    log_decay = {
        "none": None,
        "fixed": torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device=CUDA, dtype=torch.float32))),
        "head": torch.nn.functional.logsigmoid(torch.randn(B, H, T, device=CUDA, generator=gen) + 3).requires_grad_(),
        "key": (
            torch.nn.functional.logsigmoid(torch.randn(B, H, T, D, device=CUDA, generator=gen) + 3) / 16
        ).requires_grad_(),
    }[decay]
    state = torch.randn(B, H, D, D, device=CUDA, generator=gen) * 0.1 if with_state else None
    return q, k, v, log_decay, state


def _run(fn, q, k, v, g, state):
    leaves = [x for x in (q, k, v, g) if x is not None and x.requires_grad]
    for x in leaves:
        x.grad = None
    o, final = fn(q, k, v, g, state)
    gen = torch.Generator(device=CUDA).manual_seed(1)  # fixed random cotangents, O(1) gradients
    (o.float() * torch.randn(o.shape, device=CUDA, generator=gen)).sum().backward(inputs=leaves, retain_graph=True)
    grads = [x.grad.float() for x in leaves]
    for x in leaves:
        x.grad = None
    (final * torch.randn(final.shape, device=CUDA, generator=gen)).sum().backward(inputs=leaves)
    grads += [x.grad.float() for x in leaves]
    return o.detach().float(), final.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decay", ["none", "fixed", "head", "key"])
def test_fla_kernels_match_our_chunkwise_form(fla, decay, dtype):
    q, k, v, g, state = _inputs(decay, dtype)

    def ours(q, k, v, g, s):
        return chunkwise_retention(q, k, v, g, chunk_size=64, initial_state=s, output_final_state=True)

    def theirs(q, k, v, g, s):
        result = fla_dispatch.fla_decayed_linear_attention(
            q, k, v, g, mode="chunkwise", initial_state=s, output_final_state=True
        )
        assert result is not None, "not dispatched"
        return result

    o_ref, s_ref, grads_ref = _run(ours, q, k, v, g, state)
    o, s, grads = _run(theirs, q, k, v, g, state)
    assert_rel_close(o, o_ref, REL[dtype], "output")
    assert_rel_close(s, s_ref, REL[dtype], "final state")
    for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_rel_close(grad, grad_ref, REL[dtype], f"gradient {i}")


def _model(family, dtype):
    torch.manual_seed(0)
    return family.cls("ForCausalLM")(family.config(chunk_size=16)).to(CUDA, dtype)


@pytest.mark.parametrize("fla_switch", ["1", "0"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_float32_on_cuda_matches_cpu(family, fla_switch, monkeypatch):
    monkeypatch.setenv("HF_EXTRAS_FLA", fla_switch)
    model = _model(family, torch.float32).train()
    ids = torch.randint(3, 96, (2, 100), device=CUDA)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    cpu = _model(family, torch.float32).cpu().train()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    torch.testing.assert_close(
        loss.cpu(), cpu(input_ids=ids.cpu(), labels=ids.cpu()).loss.detach(), rtol=1e-3, atol=1e-3
    )
    model.eval()
    with torch.no_grad():
        cached = model.generate(ids[:, :20], max_new_tokens=12, do_sample=False)
        plain = model.generate(ids[:, :20], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_bf16_on_cuda(family):
    model = _model(family, torch.float32).train()
    ids = torch.randint(3, 96, (2, 300), device=CUDA)
    reference = model(input_ids=ids, labels=ids).loss.detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # mixed precision: float32 weights, bf16 matmuls
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(loss.float(), reference, rtol=3e-2, atol=0)
    pure = _model(family, torch.bfloat16).eval()  # bf16 weights: forward and generation run and stay finite
    with torch.no_grad():
        assert torch.isfinite(pure(input_ids=ids).logits.float()).all()
        out = pure.generate(ids[:, :20], max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 28)


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.name in ("retnet", "gla", "gated_retnet")], ids=lambda f: f.name
)
def test_fla_dispatch_inside_models_matches_pytorch_forms(fla, family, monkeypatch):
    model = _model(family, torch.float32).eval()
    ids = torch.randint(3, 96, (2, 500), device=CUDA)
    with torch.no_grad():
        dispatched = model(input_ids=ids).logits
        monkeypatch.setenv("HF_EXTRAS_FLA", "0")
        reference = model(input_ids=ids).logits
    assert_rel_close(dispatched, reference, REL[torch.float32], "logits")


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.name in ("retnet", "gla", "gated_retnet", "mamba2")], ids=lambda f: f.name
)
def test_fla_varlen_dispatch_of_packed_rows_matches_pytorch_forms(fla, family, monkeypatch):
    """Packed documents (position ids restarting at 0) through fla's cu_seqlens kernels vs our forms' resets."""
    model = _model(family, torch.float32).eval()
    ids = torch.randint(3, 96, (2, 500), device=CUDA)
    positions = torch.cat([torch.arange(130), torch.arange(300), torch.arange(70)]).to(CUDA).expand(2, -1)
    with torch.no_grad():
        dispatched = model(input_ids=ids, position_ids=positions).logits
        monkeypatch.setenv("HF_EXTRAS_FLA", "0")
        reference = model(input_ids=ids, position_ids=positions).logits
    assert_rel_close(dispatched, reference, REL[torch.float32], "logits")


@pytest.fixture
def fla_delta():
    from hf_extras.models import fla_delta_dispatch

    module = pytest.importorskip("fla")
    fla_delta_dispatch._KERNELS.clear()
    assert fla_delta_dispatch._kernels() is not None, "fla is installed but its gated delta rule did not import"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decay", ["none", "head", "boundaries"])
@pytest.mark.parametrize("mode", ["chunkwise", "recurrent"])
def test_fla_gated_delta_rule_matches_our_forms(fla_delta, decay, dtype, mode):
    """fla's chunk / fused-recurrent gated delta rule (through `fla_delta_dispatch`) against our chunkwise form:
    outputs, final states and gradients (DeltaNet, Gated DeltaNet, and packed documents with -inf boundaries)."""
    from hf_extras.models.delta_ops import gated_delta_rule
    from hf_extras.models.fla_delta_dispatch import fla_gated_delta_rule

    B, H, T, D = 2, 4, (1000 if mode == "chunkwise" else 200), 64
    gen = torch.Generator(device=CUDA).manual_seed(0)
    q, k = (
        torch.nn.functional.normalize(torch.randn(B, H, T, D, device=CUDA, generator=gen), dim=-1)
        .to(dtype)
        .requires_grad_()
        for _ in range(2)
    )
    v = torch.randn(B, H, T, D, device=CUDA, generator=gen).to(dtype).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, H, T, device=CUDA, generator=gen)).to(dtype).requires_grad_()
    g = None
    if decay != "none":
        g = torch.nn.functional.logsigmoid(torch.randn(B, H, T, device=CUDA, generator=gen) + 3)
        if decay == "boundaries":
            g[:, :, [0, 137, 138, 500]] = float("-inf")
        g.requires_grad_()
    state = torch.randn(B, H, D, D, device=CUDA, generator=gen) * 0.1
    args = dict(scale=D**-0.5, initial_state=state, output_final_state=True)

    def ours(q, k, v, g, s):
        return gated_delta_rule(q, k, v, beta, g, mode="chunkwise", chunk_size=64, **args)

    def theirs(q, k, v, g, s):
        result = fla_gated_delta_rule(q, k, v, beta, g, mode=mode, **args)
        assert result is not None, "not dispatched"
        return result

    if mode == "recurrent":  # decoding: fla's fused recurrent kernel, forward only (it has no backward)
        with torch.no_grad():
            o_ref, s_ref = ours(q, k, v, g, state)
            o, s = theirs(q, k, v, g, state)
        assert_rel_close(o, o_ref, REL[dtype], "output")
        assert_rel_close(s, s_ref, REL[dtype], "final state")
    # with gradients (a recurrent call included) the chunk kernel runs: outputs, states and gradients
    o_ref, s_ref, grads_ref = _run(ours, q, k, v, g, state)
    o, s, grads = _run(theirs, q, k, v, g, state)
    assert_rel_close(o, o_ref, REL[dtype], "output")
    assert_rel_close(s, s_ref, REL[dtype], "final state")
    for i, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert torch.isfinite(grad).all(), f"gradient {i} not finite"
        assert_rel_close(grad, grad_ref, REL[dtype], f"gradient {i}")
