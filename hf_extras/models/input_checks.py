"""Input checks run at the top of a forward, before any kernel: one clear error naming the argument and the fix.

Shape and dtype checks always run (they read metadata only). Checks that read values run for CPU tensors only: on an
accelerator reading values back would stall every forward pass (a device sync per step and per generated token).
None of them run while `torch.compile` traces (shapes there are the ones that already passed eagerly).
"""

from __future__ import annotations

import torch


def _skip_value_checks(tensor: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or tensor.device.type != "cpu" or tensor.numel() == 0


def check_token_inputs(
    input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, hidden_size: int, prefix: str = ""
) -> None:
    """`input_ids`: integer (batch, seq_len); `inputs_embeds`: floating (batch, seq_len, hidden_size); neither empty.
    `prefix` names the arguments in errors (`"decoder_"` for a seq2seq decoder's)."""
    if input_ids is None and inputs_embeds is None:
        return
    if input_ids is not None:
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(
                f"`{prefix}input_ids` must hold integer token ids (torch.long), got dtype {input_ids.dtype}: pass the "
                "tokenizer's output as it is, or convert with `input_ids.long()` (embeddings go in `inputs_embeds`)."
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"`{prefix}input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}: add a batch dimension "
                "with `input_ids[None]` for one sequence."
            )
        shape, name = input_ids.shape, f"{prefix}input_ids"
    else:
        if not inputs_embeds.is_floating_point():
            raise TypeError(
                f"`{prefix}inputs_embeds` must be floating-point vectors, got dtype {inputs_embeds.dtype}: token ids go in "
                f"`{prefix}input_ids`."
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"`{prefix}inputs_embeds` must have shape (batch, seq_len, hidden_size={hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}: build them with the model's `get_input_embeddings()` (or project them "
                f"to width {hidden_size})."
            )
        shape, name = inputs_embeds.shape, f"{prefix}inputs_embeds"
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"`{name}` is empty (shape {tuple(shape)}): pass at least one sequence with at least one token (drop "
            "empty texts before tokenizing)."
        )


def check_attention_mask_values(attention_mask: torch.Tensor) -> None:
    """A padding mask holds 1 (real token) or 0 (padding) only; anything else is a bug upstream (e.g. an additive
    -inf mask or a count), which the mixers would silently treat as a weight."""
    if attention_mask.dtype == torch.bool or _skip_value_checks(attention_mask):
        return
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"`attention_mask` must hold only 1 (real token) and 0 (padding), got the value "
            f"{attention_mask[bad][0].item()!r}: pass the tokenizer's mask (additive 0/-inf masks and counts are not "
            "padding masks)."
        )


def check_position_ids(position_ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
    """`position_ids`: integer, shape (batch, seq_len), (1, seq_len) or (seq_len,)."""
    if position_ids.is_floating_point() or position_ids.dtype == torch.bool:
        raise TypeError(f"`position_ids` must be integers (torch.long), got dtype {position_ids.dtype}.")
    ok = position_ids.shape[-1:] == (seq_len,) and (
        position_ids.dim() == 1 or (position_ids.dim() == 2 and position_ids.shape[0] in (1, batch_size))
    )
    if not ok:
        raise ValueError(
            f"`position_ids` must have shape ({batch_size}, {seq_len}) or (1, {seq_len}) for an input of "
            f"{batch_size} x {seq_len} tokens, got {tuple(position_ids.shape)}; or leave it out (positions then "
            "follow the attention mask and the cache)."
        )


def input_shape(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> tuple[int, int] | None:
    """(batch, seq_len) of whichever input was given, or `None`."""
    source = input_ids if input_ids is not None else inputs_embeds
    return None if source is None or source.dim() < 2 else (source.shape[0], source.shape[1])


def check_labels(
    labels: torch.Tensor | None, expected: tuple[int, ...] | None, name: str = "labels", of: str = "the input's"
) -> None:
    """Per-token labels: integer class ids (-100 = ignored) of exactly the input's (batch, seq_len)."""
    if labels is None or expected is None:
        return
    if labels.is_floating_point():
        raise TypeError(f"`{name}` must be integer class ids (torch.long, -100 to ignore), got dtype {labels.dtype}.")
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` must have {of} shape {tuple(expected)} (one label per token, -100 to ignore), got "
            f"{tuple(labels.shape)}: tokenize labels with the inputs (same padding and truncation)."
        )


def check_sequence_labels(labels: torch.Tensor | None, batch_size: int | None, num_labels: int) -> None:
    """Sequence-level labels: (batch,) class ids or regression targets, or (batch, num_labels) multi-label targets."""
    if labels is None or batch_size is None:
        return
    if labels.dim() == 1 and labels.shape[0] == batch_size:
        return
    if labels.dim() == 2 and tuple(labels.shape) == (batch_size, num_labels):
        return
    raise ValueError(
        f"`labels` must have shape ({batch_size},) (one class id or value per sequence) or ({batch_size}, "
        f"{num_labels}) (multi-label / num_labels regression targets), got {tuple(labels.shape)}."
    )


def check_span_positions(positions: torch.Tensor | None, batch_size: int | None, name: str) -> None:
    """Extractive-QA `start_positions` / `end_positions`: one token index per sequence."""
    if positions is None or batch_size is None:
        return
    if positions.is_floating_point() or positions.numel() != batch_size or positions.dim() > 2:
        raise ValueError(
            f"`{name}` must be integer token indices of shape ({batch_size},), one per sequence, got "
            f"{tuple(positions.shape)} of dtype {positions.dtype}."
        )


def check_seq2seq_inputs(
    hidden_size: int,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    decoder_input_ids: torch.Tensor | None,
    decoder_inputs_embeds: torch.Tensor | None,
    decoder_attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
) -> None:
    """Source and target inputs of an encoder-decoder, checked before the encoder runs. Labels are (batch,
    target_len): the decoder inputs' shape when given, else the source's batch."""
    check_token_inputs(input_ids, inputs_embeds, hidden_size)
    check_token_inputs(decoder_input_ids, decoder_inputs_embeds, hidden_size, prefix="decoder_")
    for mask in (attention_mask, decoder_attention_mask):
        if isinstance(mask, torch.Tensor):
            check_attention_mask_values(mask)
    if labels is not None:
        source = input_shape(input_ids, inputs_embeds)
        target = input_shape(decoder_input_ids, decoder_inputs_embeds)
        batch = source[0] if source else labels.shape[0]
        check_labels(labels, target or (batch, labels.shape[-1]), of="the decoder inputs'")
