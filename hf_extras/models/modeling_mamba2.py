"""Mamba-2 (SSD) on the shared backbone, with every task head.

State-space duality: Mamba-2's selective SSM with a scalar `A_h` per head,

    h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_t^T,        y_t = C_t h_t + D_h x_t,

is decayed linear attention `S_t = a_t S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` with `q = C`, `k = dt * B`, `v = x`
and the per-head, per-token log decay `log a_t = dt_t A_h <= 0`. So the scan is `retention_ops`' decayed linear
attention (parallel / chunkwise / recurrent, bidirectional for encoders), not a second kernel: its grouped variant
`grouped_decayed_linear_attention` takes B / C once per group (shared by the group's heads, never expanded per head)
and dt as a per-head key scale, in Mamba's time-major layout; on CUDA with flash-linear-attention the scan dispatches
to `chunk_simple_gla` (per-head inputs) as gated retention does.

The mixer's parameters (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj`) have the names,
shapes, split order and initialisation of transformers' `Mamba2Mixer`; only the modules around it are named by the
shared backbone (`model.embed_tokens`, `model.layers.N.mixer_norm`, `model.norm`). `hf_extras.convert.mamba2` maps
one to the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .backbone import SequenceBackbone, SharedPreTrainedModel, register_family
from .configuration_mamba2 import HfxMamba2Config
from .conv_ops import cached_conv_act
from .fla_dispatch import fla_available, fla_decayed_linear_attention
from .heads import (
    ForCausalLMHead,
    ForMaskedLMHead,
    ForQuestionAnsweringHead,
    ForSequenceClassificationHead,
    ForTokenClassificationHead,
)
from .mixer_cpu_kernels import conv_kernel_applies, gated_rms_norm, kernels_apply, mamba2_in_conv
from .retention_ops import grouped_decayed_linear_attention, pick_mode
from .seq2seq import ForConditionalGenerationHead


def _runs_own_forward(linear: nn.Module) -> bool:
    """Whether ``linear`` is exactly an ``nn.Linear`` whose call runs nothing but its own forward: no subclass (PEFT's
    LoRA layers, quantized linears, parametrizations), no module or global hooks (accelerate's offloading, DeepSpeed
    ZeRO-3's gathering, pruning), no replaced ``forward``. Only then may its weight be used directly."""
    glob = nn.modules.module
    return (
        type(linear) is nn.Linear
        and "forward" not in linear.__dict__
        and not (linear._forward_hooks or linear._forward_pre_hooks)
        and not (linear._backward_hooks or linear._backward_pre_hooks)
        and not (glob._global_forward_hooks or glob._global_forward_pre_hooks)
        and not (glob._global_backward_hooks or glob._global_backward_pre_hooks)
    )


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: `weight * groupnorm_rms(y * silu(z))`, RMS over each group of `group_size` channels;
    `norm_before_gate=True`: `weight * groupnorm_rms(y) * silu(z)` (mamba_ssm's option).

    Computed in float32 (as transformers' `MambaRMSNormGated`, gate applied before the norm by default). The class name
    contains "RMSNorm", so transformers' default `_init_weights` sets `weight` to ones.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6, norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Norm of `hidden_states` gated by `gate`. In float32 on a CPU with a gate, one compiled kernel
        (`mixer_cpu_kernels`) does it all."""
        groups = hidden_states.shape[-1] // self.group_size
        if gate is not None and kernels_apply(hidden_states, gate, self.weight):
            return gated_rms_norm(hidden_states, gate, self.weight, groups, self.eps, self.norm_before_gate)
        dtype = hidden_states.dtype
        y = hidden_states.float()
        if gate is not None and not self.norm_before_gate:
            y = y * F.silu(gate.float())
        *prefix, width = y.shape
        y = y.view(*prefix, width // self.group_size, self.group_size)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.view(*prefix, width)
        if gate is not None and self.norm_before_gate:  # gated in float32, one cast
            return (self.weight * y * F.silu(gate.float())).to(dtype)
        return self.weight * y.to(dtype)

    def extra_repr(self) -> str:
        before = ", norm_before_gate=True" if self.norm_before_gate else ""
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}{before}"


class HfxMamba2Mixer(nn.Module):
    """The Mamba-2 block: `in_proj` -> (z, xBC, dt); causal depthwise conv + act on xBC -> (x, B, C);
    `dt = clamp(softplus(dt + dt_bias), time_step_limit)`; `A = -exp(A_log)`; SSD scan through `retention_ops`
    with `q = C`, `k = dt * B` (B/C shared by the heads of a group), `v = x`, log decay `dt * A`; `+ D x`;
    gated RMS norm with z (`norm_before_gate`; or `y * silu(z)` alone with `output_norm=False`); `out_proj`.

    Padding: xBC is zeroed at padded positions before and after the conv, and `dt = 0` there, so a padded token's
    contents never reach a real token and it leaves the SSM state untouched (decay `exp(0) = 1`, key `0 * B = 0`):
    left and right padding leave the real tokens' outputs unchanged, in both directions, and the cached conv tail is
    the last real inputs, so a right-padded prefill continues as the unpadded one. An interior pad still takes a slot
    in the next tokens' conv window (read as zeros), as in Mamba-1 and transformers.
    """

    def __init__(self, config: HfxMamba2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.mixer_intermediate_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.ssm_state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.forward_mode = config.forward_mode
        self.chunk_size = config.chunk_size
        self.bidirectional = config.bidirectional
        low, high = (float(v) for v in config.time_step_limit)
        self.time_step_limit = (low, high)
        self.hidden_act = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        self.in_proj = nn.Linear(
            self.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.conv_kernel,
            groups=self.conv_dim,
            padding=config.conv_kernel - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.intermediate_size if config.D_has_hdim else self.num_heads))
        self.norm = None  # output_norm=False: y * silu(z), no norm
        if config.output_norm:
            self.norm = GatedRMSNorm(
                self.intermediate_size,
                group_size=self.intermediate_size // self.n_groups,
                eps=config.norm_eps,
                norm_before_gate=config.norm_before_gate,
            )
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.use_bias)

    @torch.no_grad()
    def init_custom_weights(self, config) -> None:
        """transformers' `Mamba2PreTrainedModel._init_weights` for a mixer: `A_h = h` (1..H), `D = 1`, `dt_bias` =
        softplus^-1 of a log-uniform `dt` in `[time_step_min, time_step_max]`, kaiming conv and `out_proj`."""
        A = torch.arange(1, self.num_heads + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        dt = torch.exp(
            torch.rand(self.num_heads, device=self.dt_bias.device, dtype=torch.float32)
            * (math.log(config.time_step_max) - math.log(config.time_step_min))
            + math.log(config.time_step_min)
        ).clamp(min=config.time_step_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if self.conv1d.bias is not None:
            init.zeros_(self.conv1d.bias)
        init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if config.rescale_prenorm_residual:
            init.copy_(self.out_proj.weight, self.out_proj.weight / math.sqrt(config.num_hidden_layers))

    def _heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        """`(batch, time, groups * width)` -> `(batch, heads, time, width)`, each group repeated for its heads."""
        batch, seq_len, _ = t.shape
        t = t.view(batch, seq_len, self.n_groups, width).transpose(1, 2)
        if self.n_groups == self.num_heads:
            return t
        per_group = self.num_heads // self.n_groups
        return t.unsqueeze(2).expand(-1, -1, per_group, -1, -1).reshape(batch, self.num_heads, seq_len, width)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        document_starts=None,
    ):
        """`document_starts`: packed documents' boundaries, where the state and the conv window reset (`None` when
        the batch is not packed); a pad reaches no later token through the conv and passes the state (`dt = 0`)."""
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        inner = self.intermediate_size
        z = None
        if cache is None and _runs_own_forward(self.in_proj):
            # z and (xBC, dt) as two GEMMs on slices of the weight: z is read in place by the norm, and neither z nor
            # its gradient is copied (8 MB a layer at T=2048)
            weight, bias = self.in_proj.weight, self.in_proj.bias
            z = F.linear(hidden_states, weight[:inner], None if bias is None else bias[:inner])
            proj = F.linear(hidden_states, weight[inner:], None if bias is None else bias[inner:])
        else:  # (z, xBC, dt) in one tensor, whose gradient the conv kernel writes whole (no concatenation)
            proj = self.in_proj(hidden_states)
        group_width = self.n_groups * self.ssm_state_size
        keep = attention_mask[..., None].to(proj.dtype) if attention_mask is not None else None
        silu = self.hidden_act == "silu"  # fused with the conv where a compiled kernel applies
        conv = self.conv1d
        if cache is None and keep is None and silu and conv_kernel_applies(proj, conv.weight, conv.bias):  # training
            widths = [0 if z is not None else inner, inner, group_width, self.num_heads]
            taps = self.conv1d.weight[:, 0, :].t()
            z_out, x, B, C, dt = mamba2_in_conv(proj, taps, self.conv1d.bias, widths, document_starts)
            z = z_out if z is None else z
        else:
            if z is None:
                z, proj = proj.split([inner, self.conv_dim + self.num_heads], dim=-1)
            xBC, dt = proj.split([self.conv_dim, self.num_heads], dim=-1)
            xBC = cached_conv_act(
                xBC,
                self.conv1d,
                cache,
                self.layer_idx,
                self.hidden_act,
                self.act,
                padding_mask=attention_mask,
                document_starts=document_starts,
            )
            x, B, C = xBC.split([self.intermediate_size, group_width, group_width], dim=-1)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # (batch, time, heads), float32
        if self.time_step_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
        if keep is not None:  # dt = 0: the state passes a padded token unchanged
            dt = dt * keep.float()
        log_decay = dt * -torch.exp(self.A_log.float())  # (batch, time, heads): dt * A <= 0
        v = x.view(batch, seq_len, self.num_heads, self.head_dim)

        state = cache.read_recurrent(self.layer_idx) if cache is not None else None
        mode = self.forward_mode
        if mode == "auto":
            mode = pick_mode(seq_len, self.chunk_size, state is not None)
        kwargs = dict(
            initial_state=state,
            output_final_state=cache is not None,
            bidirectional=self.bidirectional,
            reset=document_starts,
        )
        # + D x: one D per head (or per channel, D_has_hdim), added by the scan where it reads x anyway
        D = self.D.view(self.num_heads, -1).expand(-1, self.head_dim)
        result = None
        if fla_available(v.device):  # fla's kernels take per-head, head-first q / k / v
            q = self._heads(C, self.ssm_state_size)
            k = self._heads(B, self.ssm_state_size) * dt.transpose(1, 2)[..., None]  # float32 dt, as transformers
            result = fla_decayed_linear_attention(
                q, k, v.transpose(1, 2), log_decay.transpose(1, 2), mode=mode, **kwargs
            )
            if result is not None:
                result = result[0].transpose(1, 2) + v * D.to(v.dtype), result[1]
        if result is None:  # B / C shared by the heads of a group, never expanded per head (dt scales the keys)
            groups = (batch, seq_len, self.n_groups, self.ssm_state_size)
            result = grouped_decayed_linear_attention(
                C.view(groups), B.view(groups), v, log_decay, dt, mode=mode, chunk_size=self.chunk_size,
                skip_scale=D, **kwargs,
            )  # fmt: skip
        y, new_state = result  # (batch, time, heads, head_dim)
        if cache is not None:
            cache.write_recurrent(self.layer_idx, new_state)
        y = y.reshape(batch, seq_len, self.intermediate_size)
        if self.norm is not None:
            y = self.norm(y, z)
        else:
            y = y.float() * F.silu(z.float())
        return self.out_proj(y.to(dtype))


class HfxMamba2PreTrainedModel(SharedPreTrainedModel):
    config_class = HfxMamba2Config
    config: HfxMamba2Config


class HfxMamba2Model(HfxMamba2PreTrainedModel, SequenceBackbone):
    """The bare Mamba-2 backbone: embeddings, `x + mixer(norm(x))` blocks, final norm."""

    mixer_class = HfxMamba2Mixer


class HfxMamba2ForCausalLM(HfxMamba2PreTrainedModel, ForCausalLMHead):
    backbone_class = HfxMamba2Model


class HfxMamba2ForMaskedLM(HfxMamba2PreTrainedModel, ForMaskedLMHead):
    backbone_class = HfxMamba2Model


class HfxMamba2ForSequenceClassification(HfxMamba2PreTrainedModel, ForSequenceClassificationHead):
    backbone_class = HfxMamba2Model


class HfxMamba2ForTokenClassification(HfxMamba2PreTrainedModel, ForTokenClassificationHead):
    backbone_class = HfxMamba2Model


class HfxMamba2ForQuestionAnswering(HfxMamba2PreTrainedModel, ForQuestionAnsweringHead):
    backbone_class = HfxMamba2Model


class HfxMamba2ForConditionalGeneration(ForConditionalGenerationHead, HfxMamba2PreTrainedModel):
    """Seq2seq LM: bidirectional encoder and causal decoder stacks of HfxMamba2Model, with cross-attention."""

    backbone_class = HfxMamba2Model


AUTO_CLASSES = {
    "AutoModel": HfxMamba2Model,
    "AutoModelForCausalLM": HfxMamba2ForCausalLM,
    "AutoModelForMaskedLM": HfxMamba2ForMaskedLM,
    "AutoModelForSequenceClassification": HfxMamba2ForSequenceClassification,
    "AutoModelForTokenClassification": HfxMamba2ForTokenClassification,
    "AutoModelForQuestionAnswering": HfxMamba2ForQuestionAnswering,
    "AutoModelForSeq2SeqLM": HfxMamba2ForConditionalGeneration,
}
register_family(HfxMamba2Config, AUTO_CLASSES)

__all__ = [cls.__name__ for cls in AUTO_CLASSES.values()] + ["HfxMamba2PreTrainedModel", "HfxMamba2Mixer"]
