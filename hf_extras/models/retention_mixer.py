"""The retention token mixer shared by RetNet and gated retention.

q/k/v projections (optionally through a short causal conv and a feature map), rotary positions (tables from the
backbone, when the config has them), a decay
that the family defines (`log_decay`), the shared `retention_ops` kernel, a per-head RMS group norm and a swish
output gate. Families differ only in `log_decay`. Optional config fields (absent means the default): `key_factor`
(q/k width as a multiple of `hidden_size`, 1.0), `use_output_gate` (True) and `attention_window` (None).

With `attention_window` set, each head also reads the last `attention_window` tokens through exact softmax attention
on the same q/k/v (`window_attention`), and the block output is `o_proj(gate * (g_norm(linear) + window))`: the linear
state carries the long range, the window the sharp local attention a linear state blurs (LoLCATs). Training stays
linear in the sequence length and the cache bounded (a tail of `attention_window - 1` keys and values).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .conv_ops import cached_causal_conv
from .fla_dispatch import fla_decayed_linear_attention
from .norms import RMSNorm
from .packing import log_decay_with_padding, padding_touches_state
from .positions import apply_rotary
from .retention_ops import decayed_linear_attention, pick_mode
from .window_attention import window_attention_with_cache

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


class RetentionMixer(nn.Module):
    """Decayed linear attention with gated, group-normed output; subclasses say how the state decays."""

    def __init__(self, config, layer_idx: int, conv_size: int = 0, feature_map: str = "identity"):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        # q/k width: `hidden_size * key_factor` (fla's expand_k); values: `value_factor` x the hidden head width
        key_width = round(config.hidden_size * getattr(config, "key_factor", 1.0))
        self.head_dim = key_width // config.num_heads
        self.value_dim = (config.hidden_size // config.num_heads) * config.value_factor
        self.bidirectional = config.bidirectional
        self.forward_mode = config.forward_mode
        self.chunk_size = config.chunk_size
        self.feature_map = FEATURE_MAPS[feature_map]
        value_width = self.num_heads * self.value_dim
        self.q_proj = nn.Linear(config.hidden_size, key_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, key_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, value_width, bias=False)
        # without the output gate (fla's use_output_gate=False) the block output is o_proj(g_norm(o))
        self.use_output_gate = getattr(config, "use_output_gate", True)
        self.g_proj = nn.Linear(config.hidden_size, value_width, bias=False) if self.use_output_gate else None
        self.o_proj = nn.Linear(value_width, config.hidden_size, bias=False)
        self.g_norm = RMSNorm(self.value_dim, config.norm_eps)
        self.attention_window = getattr(config, "attention_window", None)
        self.conv_size = conv_size
        if conv_size > 0:  # one depthwise conv over the concatenated q, k, v channels
            channels = 2 * key_width + value_width
            self.conv1d = nn.Conv1d(channels, channels, conv_size, groups=channels, bias=False)

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """`None`, `(H,)`, `(B, H, T)` or `(B, H, T, Dk)` log decays (<= 0); see `retention_ops`."""
        raise NotImplementedError

    def _project(self, hidden_states, attention_mask, cache, document_starts):
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.conv_size > 0:  # pads and earlier documents never reach a token through the conv window
            qkv = torch.cat([q, k, v], dim=-1)
            mixed = cached_causal_conv(
                qkv,
                self.conv1d,
                cache,
                self.layer_idx,
                padding_mask=attention_mask,
                document_starts=document_starts,
                activation="silu",
            )
            q, k, v = mixed.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        return q, k, v

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        document_starts=None,
    ):
        """`position_embeddings`: the rotary `(cos, sin)` tables the backbone computed once for every layer (`None`
        without rotary positions, `config.rotary_positions`); `document_starts`: packed documents' boundaries, where
        the state and the conv window reset (`None` when the batch is not packed)."""
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self._project(hidden_states, attention_mask, cache, document_starts)
        q = self.feature_map(q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.feature_map(k.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2))
        v = v.view(batch, seq_len, self.num_heads, self.value_dim).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        k = k * (self.head_dim**-0.5)
        window_out = None
        if self.attention_window:  # exact softmax over the recent tokens, on the same q/k/v
            window_out = window_attention_with_cache(
                q,
                k,
                v,
                self.attention_window,
                cache,
                self.layer_idx,
                bidirectional=self.bidirectional,
                padding_mask=attention_mask,
                document_starts=document_starts,
            )
        if attention_mask is not None:  # padded tokens write nothing into the state
            keep = attention_mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep

        state = cache.read_recurrent(self.layer_idx) if cache is not None else None
        mode = self.forward_mode
        if mode == "auto":
            mode = pick_mode(seq_len, self.chunk_size, state is not None)
        log_decay = self.log_decay(hidden_states)
        if (
            attention_mask is not None
            and log_decay is not None
            and padding_touches_state(log_decay, attention_mask, carried_state=state is not None)
        ):
            log_decay = log_decay_with_padding(log_decay, attention_mask)  # a pad neither writes nor decays the state
        kwargs = dict(
            initial_state=state,
            output_final_state=cache is not None,
            bidirectional=self.bidirectional,
            reset=document_starts,
        )
        result = fla_decayed_linear_attention(q, k, v, log_decay, mode=mode, **kwargs)  # None unless CUDA + fla
        if result is None:
            result = decayed_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=self.chunk_size, **kwargs)
        out, new_state = result
        if cache is not None:
            cache.write_recurrent(self.layer_idx, new_state)
        out = self.g_norm(out.transpose(1, 2))
        if window_out is not None:
            out = out + window_out.transpose(1, 2).to(out.dtype)
        out = out.reshape(batch, seq_len, self.num_heads * self.value_dim)
        if self.g_proj is not None:
            out = F.silu(self.g_proj(hidden_states)) * out
        return self.o_proj(out)
