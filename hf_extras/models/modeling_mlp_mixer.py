"""MLP-Mixer (Tolstikhin et al. 2021): patches or tokens mixed by MLPs only, with image and text heads.

Module names follow timm's `MlpMixer` (`stem.proj`, `blocks.N.norm1`, `blocks.N.mlp_tokens.fc1/fc2`,
`blocks.N.norm2`, `blocks.N.mlp_channels.fc1/fc2`, `norm`, `head`) under the base-model prefix `model`, so importing
timm weights is a rename (`hf_extras.convert.timm_mixer`).

Text mode (`config.modality == "text"`) mixes a fixed window of `max_position_embeddings` positions:

- Padding: real tokens are first packed to the front of the window (stable, so their order is kept; left and right
  padding become the same input), and padded positions are zeroed before every token-mixing MLP, i.e. their
  columns of `fc1` never contribute. Outputs are put back in the caller's positions at the end. A padded token
  therefore never changes a real token's output, whatever its id or however much padding there is.
- Causality (`bidirectional=False`): the token-mixing MLP is masked like MADE (Germain et al. 2015). Each hidden unit
  `h` of `mlp_tokens` gets a degree `d(h)` in `[0, T)` (`T` the window), non-decreasing in `h` and spread evenly
  over positions: `d(h) = floor((h * n + i) * T / (D_S * n))` in block `i` of `n` (`D_S` = `tokens_mlp_dim`).
  `fc1` connects input position `s` to unit `h` only if `s <= d(h)`, and `fc2` connects unit `h` to output
  position `t` only if `d(h) <= t`. Every path from input `s` to output `t` then has `s <= d(h) <= t`: output `t`
  depends on positions `<= t` only, through both layers and the GELU between them. Channel mixing and the norms
  act per position, so the whole model is causal. With `D_S >= T` every block uses every degree, so each output
  sees every earlier position; with `D_S < T` a block cannot (a pair `s <= t` needs a unit with degree in
  `[s, t]`), and the offset `i` staggers the degrees from block to block so that depth fills the gaps. The masks
  are built from `arange` at each call (no buffer to initialise on load) and applied to the weights, whose shapes
  stay timm's. Positions beyond the input's length are sliced away, which equals zero input there, so an input of
  length `L` gives exactly the first `L` outputs of any longer input that starts with it.
- Generation has no cache: each new token recomputes the whole window (cost grows with the window, which is
  fixed and small), and a sequence may not grow past `max_position_embeddings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import can_return_tuple

from .backbone import (
    BackboneOutput,
    SharedPreTrainedModel,
    embed_inputs,
    padding_mask,
    register_family,
)
from .configuration_mlp_mixer import MlpMixerConfig
from .heads import ForCausalLMHead, ForSequenceClassificationHead, ForTokenClassificationHead
from .input_checks import check_sequence_labels
from .norms import build_norm


@dataclass
class MlpMixerModelOutput(BackboneOutput):
    """`BackboneOutput` plus `pooler_output`: the mean over patches of the final hidden states (image mode)."""

    pooler_output: torch.Tensor | None = None


def causal_degrees(tokens_mlp_dim: int, window: int, block: int = 0, num_blocks: int = 1, device=None) -> torch.Tensor:
    """Degree `d(h) = floor((h * num_blocks + block) * window / (tokens_mlp_dim * num_blocks))` of each hidden unit
    of a causal token-mixing MLP: in `[0, window)`, non-decreasing in `h`, staggered from block to block."""
    units = torch.arange(tokens_mlp_dim, device=device, dtype=torch.int64)
    return (units * num_blocks + block) * window // (tokens_mlp_dim * num_blocks)


def causal_token_masks(
    tokens_mlp_dim: int, window: int, length: int, device=None, dtype=None, block: int = 0, num_blocks: int = 1
):
    """MADE masks of the token-mixing MLP for the first `length` positions of a `window`-position model.

    Returns `(mask1, mask2, used)`: `mask1` (used, length) for `fc1.weight`, `mask2` (length, used) for
    `fc2.weight`, and `used`, the number of hidden units that feed any of the first `length` outputs (degrees grow
    with the unit index, so they are a prefix).
    """
    # units with d(h) < length, i.e. (h * n + block) * window < length * units * n: a prefix, counted without
    # reading a device tensor back (no host sync on accelerators)
    bound = -(-length * tokens_mlp_dim * num_blocks // window)  # ceil
    used = max(0, min(tokens_mlp_dim, -(-(bound - block) // num_blocks)))
    degrees = causal_degrees(tokens_mlp_dim, window, block, num_blocks, device)[:used]
    positions = torch.arange(length, device=device)
    mask1 = positions[None, :] <= degrees[:, None]  # unit h reads positions s <= d(h)
    mask2 = degrees[None, :] <= positions[:, None]  # position t reads units with d(h) <= t
    return mask1.to(dtype), mask2.to(dtype), used


class MixerMlp(nn.Module):
    """timm's `Mlp`: `fc1 -> act -> dropout -> fc2 -> dropout`, with biases."""

    def __init__(self, in_features: int, hidden_features: int, hidden_act: str, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TokenMixingMlp(MixerMlp):
    """The MLP across positions (input `(batch, channels, length)`), for inputs up to the full window, optionally causal."""

    def __init__(
        self,
        num_tokens: int,
        hidden_features: int,
        hidden_act: str,
        dropout: float,
        block: int = 0,
        num_blocks: int = 1,
    ):
        super().__init__(num_tokens, hidden_features, hidden_act, dropout)
        self.num_tokens = num_tokens
        self.block, self.num_blocks = block, num_blocks  # staggers the causal degrees across blocks

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        length = x.shape[-1]
        if length == self.num_tokens and not causal:
            return super().forward(x)  # exactly timm's computation
        w1, b1 = self.fc1.weight[:, :length], self.fc1.bias
        w2, b2 = self.fc2.weight[:length], self.fc2.bias[:length]
        if causal:
            mask1, mask2, used = causal_token_masks(
                w1.shape[0], self.num_tokens, length, x.device, w1.dtype, self.block, self.num_blocks
            )
            w1, b1, w2 = w1[:used] * mask1, b1[:used], w2[:, :used] * mask2
        hidden = self.drop(self.act(F.linear(x, w1, b1)))
        return self.drop(F.linear(hidden, w2, b2))


class MixerBlock(GradientCheckpointingLayer):
    """`x = x + mlp_tokens(norm1(x)^T)^T; x = x + mlp_channels(norm2(x))` (pre-norm, as timm's `MixerBlock`)."""

    def __init__(self, config: MlpMixerConfig, layer_idx: int = 0):
        super().__init__()
        norm_args = (config.norm_type, config.hidden_size, config.norm_eps, config.dyt_alpha_init)
        self.norm1 = build_norm(*norm_args)
        self.mlp_tokens = TokenMixingMlp(
            config.num_tokens, config.tokens_mlp_dim, config.hidden_act, config.hidden_dropout,
            block=layer_idx, num_blocks=config.num_hidden_layers,
        )  # fmt: skip
        self.norm2 = build_norm(*norm_args)
        self.mlp_channels = MixerMlp(
            config.hidden_size, config.channels_mlp_dim, config.hidden_act, config.hidden_dropout
        )

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None, causal: bool = False):
        normed = self.norm1(hidden_states)
        if token_mask is not None:
            normed = normed * token_mask  # padded positions contribute nothing to token mixing
        mixed = self.mlp_tokens(normed.transpose(1, 2), causal=causal).transpose(1, 2)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp_channels(self.norm2(hidden_states))


class MixerPatchEmbed(nn.Module):
    """Per-patch linear embedding: a conv with kernel = stride = `patch_size` (timm's `PatchEmbed`, no norm)."""

    def __init__(self, config: MlpMixerConfig):
        super().__init__()
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        patch = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch, stride=patch)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {', '.join(map(str, expected))}) = (batch, num_channels, "
                f"image_size, image_size), got {tuple(pixel_values.shape)}: the token-mixing MLP has one weight per "
                "patch, so the image size is fixed; resize with MlpMixerImageProcessor."
            )
        return self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class MlpMixerPreTrainedModel(SharedPreTrainedModel):
    config_class = MlpMixerConfig
    config: MlpMixerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MixerBlock"]
    _is_stateful = False  # no recurrent state: generation recomputes the window

    def _init_weights(self, module: nn.Module) -> None:
        # children are initialised before their parents, so these override the generic Linear/Conv2d init
        super()._init_weights(module)
        if isinstance(module, MixerMlp):  # timm's Mixer init (Xavier-uniform weights, tiny-normal biases)
            for fc in (module.fc1, module.fc2):
                init.xavier_uniform_(fc.weight)
                init.normal_(fc.bias, std=1e-6)
        elif isinstance(module, MixerPatchEmbed):
            init.lecun_normal_(module.proj.weight)
            init.zeros_(module.proj.bias)


class MlpMixerModel(MlpMixerPreTrainedModel):
    """The bare Mixer: patch (image) or token (text) embedding, Mixer blocks, final norm.

    Image mode takes `pixel_values` (a floating tensor passed first is taken as `pixel_values`) and also returns
    `pooler_output`, the mean over patches. Text mode takes `input_ids` (or `inputs_embeds`) and an optional 2-D
    `attention_mask`. What the shared heads and `generate()` also pass (`position_ids`, a cache, `use_cache`) lands in
    `**kwargs` and is ignored: positions are the window's, after packing the real tokens to the front, and there is
    no cache.
    """

    def __init__(self, config: MlpMixerConfig):
        super().__init__(config)
        if config.modality == "image":
            self.stem = MixerPatchEmbed(config)
            self._input_embed_layer = "stem"  # what transformers' embedding accessors return: the patch embedding
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.blocks = nn.ModuleList(MixerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.norm_eps, config.dyt_alpha_init)
        self.gradient_checkpointing = False
        self.post_init()

    def _text_embeddings(self, input_ids, inputs_embeds):
        inputs_embeds = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, self.config.vocab_size)
        seq_len, window = inputs_embeds.shape[1], self.config.max_position_embeddings
        if seq_len > window:
            raise ValueError(
                f"The input has {seq_len} tokens but this MLP-Mixer mixes a fixed window of "
                f"max_position_embeddings={window} positions (its token-mixing weights are per position): truncate "
                f"the input to at most {window} tokens (e.g. `tokenizer(..., truncation=True, max_length={window})`, "
                f"or generate at most {window} tokens in total)."
            )
        return inputs_embeds

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> MlpMixerModelOutput:
        # hidden states are collected here, not by `capture_outputs` hooks: in text mode they are put back in the
        # caller's token order after the stack, which a hook on each block cannot do
        image_mode = self.config.modality == "image"
        if image_mode:
            if pixel_values is None and input_ids is not None and input_ids.is_floating_point():
                pixel_values, input_ids = input_ids, None
            if pixel_values is None or input_ids is not None or inputs_embeds is not None:
                raise ValueError(
                    "This MLP-Mixer is in image mode (config.modality='image'): pass `pixel_values` of shape "
                    "(batch, num_channels, image_size, image_size); build it with modality='text' to read token ids."
                )
            hidden_states = self.stem(pixel_values)
            mask = causal = None
        else:
            if pixel_values is not None:
                raise ValueError(
                    "This MLP-Mixer is in text mode (config.modality='text'): pass `input_ids`, not `pixel_values`."
                )
            hidden_states = self._text_embeddings(input_ids, inputs_embeds)
            mask = padding_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1], 0)
            causal = not self.config.bidirectional

        restore = None
        if mask is not None:
            mask = mask.to(hidden_states.device).bool()
            if bool(mask.all()):
                mask = None
            else:
                # pack real tokens to the front of the window (stable: order kept), undo at the end
                order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
                hidden_states = hidden_states.gather(1, order[..., None].expand_as(hidden_states))
                mask = mask.gather(1, order)
                restore = order.argsort(dim=1)
        token_mask = mask[..., None].to(hidden_states.dtype) if mask is not None else None

        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        all_hidden = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states, token_mask, bool(causal))
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        if restore is not None:
            unpack = restore[..., None].expand_as(hidden_states)
            hidden_states = hidden_states.gather(1, unpack)
            if all_hidden is not None:
                all_hidden = tuple(h.gather(1, unpack) for h in all_hidden)
        return MlpMixerModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden,
            pooler_output=hidden_states.mean(dim=1) if image_mode else None,
        )


class MlpMixerForImageClassification(MlpMixerPreTrainedModel):
    """Mixer + global average pooling over patches + linear `head` (timm's `MlpMixer`)."""

    main_input_name = "pixel_values"
    accepts_loss_kwargs = False  # mean loss: let Trainer scale for gradient accumulation

    def __init__(self, config: MlpMixerConfig):
        super().__init__(config)
        if config.modality != "image":
            raise ValueError(f"{type(self).__name__} classifies images: build it with `modality='image'`.")
        self.num_labels = config.num_labels
        self.model = MlpMixerModel(config)
        self.head_drop = nn.Dropout(config.hidden_dropout)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        if pixel_values is not None:
            check_sequence_labels(labels, pixel_values.shape[0], self.config.num_labels)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        logits = self.head(self.head_drop(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class _MlpMixerTextHead(MlpMixerPreTrainedModel):
    """Text heads from `heads.py` on a text-mode Mixer backbone."""

    backbone_class = MlpMixerModel

    def _build_backbone(self, config) -> None:
        if config.modality != "text":
            raise ValueError(
                f"{type(self).__name__} reads token ids: build it with `modality='text'` (and "
                "`max_position_embeddings`, the fixed window of positions the token-mixing MLP covers)."
            )
        super()._build_backbone(config)


class MlpMixerForCausalLM(_MlpMixerTextHead, ForCausalLMHead):
    """Causal LM: the token-mixing MLPs are masked lower-triangular, so no position sees a later one.

    `generate()` works without a cache: every step recomputes the whole (fixed, small) window, and the total length
    (prompt plus new tokens) may not exceed `max_position_embeddings`.
    """

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        # no cache: always feed the whole sequence (generate() would otherwise pass only the newest token)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)


class MlpMixerForSequenceClassification(_MlpMixerTextHead, ForSequenceClassificationHead):
    """Sequence classification on a text-mode Mixer (padded positions never influence real ones)."""


class MlpMixerForTokenClassification(_MlpMixerTextHead, ForTokenClassificationHead):
    """Token classification on a text-mode Mixer (padded positions never influence real ones)."""


AUTO_CLASSES = {
    "AutoModel": MlpMixerModel,
    "AutoModelForImageClassification": MlpMixerForImageClassification,
    "AutoModelForCausalLM": MlpMixerForCausalLM,
    "AutoModelForSequenceClassification": MlpMixerForSequenceClassification,
    "AutoModelForTokenClassification": MlpMixerForTokenClassification,
}
register_family(MlpMixerConfig, AUTO_CLASSES)

__all__ = [
    "MlpMixerPreTrainedModel",
    "MlpMixerModel",
    "MlpMixerModelOutput",
    "MlpMixerForImageClassification",
    "MlpMixerForCausalLM",
    "MlpMixerForSequenceClassification",
    "MlpMixerForTokenClassification",
    "causal_degrees",
    "causal_token_masks",
]
