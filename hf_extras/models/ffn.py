"""Channel mixers: MLP, GLU and a top-k routed mixture of GLU experts, chosen by `ffn_type`.

Every FFN returns `(output, aux_loss)`; `aux_loss` is the MoE load-balancing loss (`None` for dense FFNs), which
the backbone sums over layers and the heads add to the training loss with `router_aux_loss_coef`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class MLP(nn.Module):
    """`down(act(up(x)))`, the classic Transformer FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.down_proj(self.act_fn(self.up_proj(x))), None


class GLU(nn.Module):
    """`down(act(gate(x)) * up(x))` (SwiGLU with `hidden_act="silu"`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)), None


class MoE(nn.Module):
    """Top-k routed GLU experts with the Switch-Transformer load-balancing loss.

    Each token goes to its `top_k` experts, weighted by the renormalised router probabilities. The auxiliary loss
    `E * sum_e f_e * P_e` (f: fraction of routed slots, P: mean router probability, over real tokens only) is 1 for
    perfectly balanced routing and grows as routing collapses.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, hidden_act: str = "silu"
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(GLU(hidden_size, intermediate_size, hidden_act) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(chosen == e)
            if token_idx.numel() == 0:
                continue
            y, _ = expert(flat[token_idx])
            out.index_add_(0, token_idx, y * weights[token_idx, slot, None])
        # load balancing over real tokens
        routed = F.one_hot(chosen, self.num_experts).sum(1).float()  # (N, E)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == flat.shape[0]:
            keep = attention_mask.reshape(-1, 1).to(probs.dtype)
            denom = keep.sum().clamp_min(1.0)
            frac = (routed * keep).sum(0) / (denom * self.top_k)
            mean_prob = (probs * keep).sum(0) / denom
        else:
            frac = routed.mean(0) / self.top_k
            mean_prob = probs.mean(0)
        aux = self.num_experts * (frac * mean_prob).sum()
        return out.reshape(shape), aux


def build_ffn(config) -> nn.Module:
    """The channel mixer that `config.ffn_type` names."""
    if config.ffn_type == "mlp":
        return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
    if config.ffn_type == "glu":
        return GLU(config.hidden_size, config.intermediate_size, config.hidden_act)
    if config.ffn_type == "moe":
        return MoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.hidden_act,
        )
    raise ValueError(f"`ffn_type` must be 'mlp', 'glu', 'moe' or 'none', got {config.ffn_type!r}.")
