"""The shared backbone: `x = x + mixer(norm(x)); x = x + ffn(norm(x))`, written once for every sequence family.

A family supplies only its token mixer (`mixer_class`) and config; embeddings, blocks, final norm, input checks,
cache handling, initialisation and the remote-code auto map live here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import capture_outputs

from .attention import CrossAttention
from .attention_masks import cross_document_mask_function
from .cache import RecurrentCache, as_recurrent_cache
from .ffn import build_ffn
from .hybrid import HybridAttention, attention_rotary, hybrid_masks
from .input_checks import check_attention_mask_values, check_position_ids, check_token_inputs
from .norms import DyT, build_norm
from .packing import packed_document_starts
from .positions import positions_from_mask, rotary_cos_sin


@dataclass
class BackboneOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the summed MoE load-balancing loss (`None` without MoE)."""

    aux_loss: torch.Tensor | None = None


def pop_cache_kwarg(cache, kwargs: dict):
    """The cache, whatever name the caller used: `cache` (transformers >= 5.24), `past_key_values`, `cache_params`."""
    for name in ("past_key_values", "cache_params"):
        other = kwargs.pop(name, None)
        if cache is None and other is not None:
            cache = other
    return cache


def padding_mask(attention_mask, batch_size: int, seq_len: int, past_len: int) -> torch.Tensor | None:
    """Validate a 2-D padding mask and return it (new and past tokens), or `None`.

    Decode steps may receive `{"linear_attention": mask}` dicts; 4-D attention masks are refused because a
    recurrent mixer has no pairwise mask to apply.
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("linear_attention", attention_mask.get("full_attention"))
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(
            f"`attention_mask` must be a 2-D padding mask of shape (batch, seq_len) with 1 for real tokens, got {shape}."
        )
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] not in (seq_len, past_len + seq_len):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but the input is (batch={batch_size}, "
            f"seq_len={seq_len}) with {past_len} cached tokens: expected ({batch_size}, {seq_len}) or "
            f"({batch_size}, {past_len + seq_len})."
        )
    check_attention_mask_values(attention_mask)
    return attention_mask


def embed_inputs(embed_tokens: nn.Embedding, input_ids, inputs_embeds, vocab_size: int) -> torch.Tensor:
    """The input embeddings from exactly one of `input_ids` (checked against the vocabulary, then looked up in
    `embed_tokens`) or `inputs_embeds` (returned as given); shared by every family's backbone."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    check_token_inputs(input_ids, inputs_embeds, embed_tokens.embedding_dim)
    if input_ids is None:
        return inputs_embeds
    check_input_ids(input_ids, vocab_size)
    return embed_tokens(input_ids)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse token ids outside the vocabulary before any kernel (an embedding lookup would fail obscurely).

    CPU tensors only: on an accelerator reading the bounds back would stall every forward pass (a device sync per
    training step and per generated token), and CUDA's own device-side assert already names the embedding lookup.
    """
    if torch.compiler.is_compiling() or input_ids.numel() == 0 or input_ids.device.type != "cpu":
        return
    low, high = torch.aminmax(input_ids)
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` contain ids outside the vocabulary [0, {vocab_size}): min {low}, max {high}. "
            "Check that the tokenizer matches the model (config.vocab_size)."
        )


class SequenceBlock(GradientCheckpointingLayer):
    """One pre-norm residual block around a family's token mixer and the shared FFN.

    With `config.add_cross_attention` (a seq2seq decoder) a pre-norm residual softmax cross-attention over the
    encoder states sits between the mixer and the FFN.
    """

    def __init__(self, config, layer_idx: int, mixer_class: type[nn.Module]):
        super().__init__()
        # DyT before the mixer may start from its own alpha (the DyT paper's LLM recipe: larger on the attention side)
        mixer_alpha = getattr(config, "dyt_attn_alpha_init", None)
        mixer_alpha = config.dyt_alpha_init if mixer_alpha is None else mixer_alpha
        self.mixer_norm = build_norm(config.norm_type, config.hidden_size, config.norm_eps, mixer_alpha)
        self.mixer = mixer_class(config, layer_idx)
        if getattr(config, "add_cross_attention", False):
            self.cross_norm = build_norm(config.norm_type, config.hidden_size, config.norm_eps, mixer_alpha)
            self.cross_attn = CrossAttention(config, layer_idx)
        else:
            self.cross_norm = self.cross_attn = None
        if config.ffn_type != "none":
            self.ffn_norm = build_norm(config.norm_type, config.hidden_size, config.norm_eps, config.dyt_alpha_init)
            self.ffn = build_ffn(config)
        else:
            self.ffn_norm = self.ffn = None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.residual_in_fp32 = config.residual_in_fp32

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        cache=None,
        padding_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cross_cache=None,
        document_starts=None,
        **kwargs,
    ):
        """`attention_mask` is what the mixer gets (see `SequenceBackbone.mixer_attention_mask`); `padding_mask`, the
        2-D mask of the new tokens for the FFN (MoE statistics over real tokens), defaults to `attention_mask`;
        `position_embeddings` the rotary `(cos, sin)` tables the backbone computed once for every layer (or `None`);
        `document_starts` the `(B, T)` boundaries of packed documents (or `None`; see `packing.packed_document_starts`).
        `encoder_*` and `cross_cache` (an `EncoderDecoderCache`) feed the cross-attention of a decoder block."""
        dtype = self.mixer_norm.weight.dtype
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        normed = self.mixer_norm(hidden_states.to(dtype))
        mixed = self.mixer(
            normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            document_starts=document_starts,
        )
        hidden_states = residual + self.dropout(mixed)
        if self.cross_attn is not None:
            if encoder_hidden_states is None:
                raise ValueError("A decoder block with cross-attention needs `encoder_hidden_states`.")
            normed = self.cross_norm(hidden_states.to(dtype))
            attended = self.cross_attn(normed, encoder_hidden_states.to(dtype), encoder_attention_mask, cross_cache)
            hidden_states = hidden_states + self.dropout(attended)
        if self.ffn is None:
            return hidden_states, None
        ffn_mask = attention_mask if padding_mask is None else padding_mask
        ffn_out, aux = self.ffn(self.ffn_norm(hidden_states.to(dtype)), ffn_mask)
        return hidden_states + self.dropout(ffn_out), aux


class SharedPreTrainedModel(PreTrainedModel):
    """Base of every hf_extras model: initialisation, recurrent-cache opt-out, remote-code auto map.

    Softmax attention (DyT, hybrid attention layers, seq2seq cross-attention) goes through transformers' attention
    interface, so every family declares SDPA and the registered backends: transformers then picks SDPA by default,
    as for Llama (a family without attention layers never calls it).
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SequenceBlock"]
    _is_stateful = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _family_auto_map: dict[str, str] = {}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the model builds its own fixed-size RecurrentCache; a default KV cache would be wrong
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DyT):
            init.constant_(module.alpha, module.alpha_init)
            init.constant_(module.weight, module.weight_init)
            init.zeros_(module.bias)
        init_hook = getattr(module, "init_custom_weights", None)
        if init_hook is not None:
            init_hook(self.config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # every head of the family in auto_map, so any Auto class loads the folder with trust_remote_code
        if self._family_auto_map:
            self.config.auto_map = dict(self._family_auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)


class SequenceBackbone(SharedPreTrainedModel):
    """Embeddings, a stack of `SequenceBlock`s around `mixer_class`, and a final norm."""

    mixer_class: type[nn.Module]
    _can_record_outputs = {"hidden_states": SequenceBlock}

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        # a hybrid schedule puts softmax attention in the blocks `layer_types` names; the rest get the family's mixer
        self.layer_kinds = list(config.resolved_layer_types) if config.is_hybrid else None
        self.layers = nn.ModuleList(SequenceBlock(config, i, self.layer_mixer_class(i)) for i in range(len(self)))
        self.norm = build_norm(
            config.norm_type,
            config.hidden_size,
            config.norm_eps,
            config.dyt_alpha_init,
            config.resolved_dyt_final_weight_init,
        )
        self.gradient_checkpointing = False
        self.post_init()

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def layer_mixer_class(self, layer_idx: int) -> type[nn.Module]:
        """The mixer of block `layer_idx`: the family's own, or softmax attention where the schedule says so."""
        if self.layer_kinds is None or self.layer_kinds[layer_idx] == "linear_attention":
            return self.mixer_class
        return HybridAttention

    # --- hooks a family may override (the defaults are the recurrent families' behaviour) ---

    def prepare_cache(self, cache, use_cache: bool):
        """The cache this forward works with: by default the fixed-size `RecurrentCache` (given, new, or `None`)."""
        return as_recurrent_cache(cache, self.config, use_cache)

    def finish_embeddings(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings -> the first block's input (e.g. add absolute positions); identity by default."""
        return inputs_embeds

    def mixer_attention_mask(
        self,
        padding_mask,
        inputs_embeds: torch.Tensor,
        cache,
        position_ids: torch.Tensor,
        prefix_mask=None,
        document_starts=None,
    ):
        """What every mixer receives as `attention_mask`.

        `padding_mask` is the validated 2-D mask (past and new tokens, or new tokens only) or `None`. Recurrent mixers
        take its new-token columns (they get `document_starts` separately); a pairwise-attention family returns a 4-D
        causal/bidirectional mask instead, block-diagonal over packed documents (`document_starts`), and a prefix-LM
        family joins the two by `prefix_mask` (validated by `forward`).
        """
        return padding_mask[:, -inputs_embeds.shape[1] :] if padding_mask is not None else None

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BackboneOutput:
        """`encoder_hidden_states`/`encoder_attention_mask` (2-D source padding mask) feed the cross-attention of a
        seq2seq decoder stack, whose `cache` is then an `EncoderDecoderCache`. `prefix_mask` (1 = source token, seen
        both ways; columns missing at the end count as target) needs a config with `prefix_lm=True`.
        `output_hidden_states` (embeddings, then every block's output, the last one after the final norm) and
        `return_dict` are handled by transformers' `capture_outputs` (hooks on `SequenceBlock`).

        Packed (padding-free) batches, as transformers' `DataCollatorWithFlattening` writes them: `position_ids` that
        restart at 0 for each document, or `seq_idx` / `cu_seq_lens_q` (in `kwargs`). Every mixer then keeps the
        documents apart (a recurrent state and conv window reset at each start, block-diagonal attention), so each
        document gives the outputs it gives alone. Positions derived from `attention_mask` never mark documents."""
        cache = pop_cache_kwarg(cache, kwargs)
        cross_cache = None
        if isinstance(cache, EncoderDecoderCache):  # the mixers keep the self-state, cross-attention the encoder k/v
            cross_cache, cache = cache, cache.self_attention_cache
        if prefix_mask is not None and not getattr(self.config, "prefix_lm", False):
            raise ValueError(
                f"`prefix_mask` needs a prefix LM: build {type(self.config).__name__} with `prefix_lm=True` "
                "(a family with pairwise attention, e.g. DyT)."
            )
        inputs_embeds = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, self.config.vocab_size)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if position_ids is not None:
            check_position_ids(position_ids, batch_size, seq_len)
            position_ids = position_ids.view(-1, seq_len).expand(batch_size, -1)

        if self.config.bidirectional or (self.gradient_checkpointing and self.training):
            use_cache = False
        elif use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = self.prepare_cache(cache, use_cache)
        past_len = cache.get_seq_length() if cache is not None else 0

        full_mask = padding_mask(attention_mask, batch_size, seq_len, past_len)
        new_mask = full_mask[:, -seq_len:] if full_mask is not None else None
        document_starts = packed_document_starts(
            batch_size, seq_len, new_mask, position_ids, kwargs.get("seq_idx"), kwargs.get("cu_seq_lens_q")
        )
        if position_ids is None:
            position_ids = positions_from_mask(full_mask, seq_len, past_len, inputs_embeds.device)
        if position_ids.shape[0] != batch_size:
            position_ids = position_ids.expand(batch_size, -1)
        inputs_embeds = self.finish_embeddings(inputs_embeds, position_ids)
        mixer_mask = self.mixer_attention_mask(
            full_mask, inputs_embeds, cache, position_ids, prefix_mask, document_starts=document_starts
        )
        cross = {}
        if encoder_hidden_states is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                # packed pairs: target document i attends to source document i only
                and_mask_function=cross_document_mask_function(document_starts, kwargs.get("encoder_document_starts")),
            )
            cross = dict(
                encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=cross_mask, cross_cache=cross_cache
            )

        # rotary tables once per forward, shared by every layer (as LlamaModel does); None without rotary positions
        position_embeddings = None
        if self.config.rotary_positions:
            position_embeddings = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        kinds = self.layer_kinds or ["linear_attention"] * len(self.layers)
        layer_masks = {"linear_attention": mixer_mask}
        layer_positions = {"linear_attention": position_embeddings}
        if self.layer_kinds is not None:  # the attention blocks of a hybrid: their own masks and rotary tables
            layer_masks.update(hybrid_masks(self.config, full_mask, inputs_embeds, cache, document_starts))
            rotary = attention_rotary(self.config, position_ids)
            layer_positions.update(full_attention=rotary, sliding_attention=rotary)
        hidden_states = inputs_embeds
        aux_total = None
        for kind, layer in zip(kinds, self.layers):
            hidden_states, aux = layer(
                hidden_states,
                attention_mask=layer_masks[kind],
                position_ids=position_ids,
                position_embeddings=layer_positions[kind],
                cache=cache,
                padding_mask=new_mask,
                document_starts=document_starts,
                **cross,
            )
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        if isinstance(cache, RecurrentCache):  # a KV cache counts its tokens itself
            cache.advance(seq_len)
        return BackboneOutput(last_hidden_state=hidden_states, cache=cache if use_cache else None, aux_loss=aux_total)


def register_family(config_class, classes: dict[str, type]) -> None:
    """Mark a family's classes for `save_pretrained` code export and record the full `auto_map`.

    `classes` maps Auto class names (`"AutoModel"`, `"AutoModelForCausalLM"`, ...) to model classes. Called at the
    bottom of each `modeling_<family>.py`, so it also runs inside a `trust_remote_code` load.
    """
    config_class.register_for_auto_class()
    auto_map = {"AutoConfig": f"{config_class.__module__.split('.')[-1]}.{config_class.__name__}"}
    for auto_name, cls in classes.items():
        cls.register_for_auto_class(auto_name)
        auto_map[auto_name] = f"{cls.__module__.split('.')[-1]}.{cls.__name__}"
    for cls in classes.values():
        cls._family_auto_map = auto_map
