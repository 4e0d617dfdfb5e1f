"""Padding never touches a data-dependent decay's state: a pad has k = v = 0 and log decay 0 (a = 1), so a row with pads
inside gives its real tokens the outputs of the row without them (issue 17, item 3)."""

import pytest
import torch

from hf_extras import GatedRetentionConfig, GatedRetentionForCausalLM


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("gate", ["head", "key"])
def test_interior_and_right_pads_leave_real_tokens_unchanged(gate, mode):
    torch.manual_seed(0)
    config = GatedRetentionConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=4, gate=gate, forward_mode=mode
    )
    model = GatedRetentionForCausalLM(config).eval()
    real = torch.randint(3, 64, (1, 10))
    padded = torch.cat(
        [real[:, :4], torch.zeros(1, 3, dtype=torch.long), real[:, 4:], torch.zeros(1, 2, dtype=torch.long)], 1
    )
    mask = torch.ones_like(padded)
    mask[:, 4:7] = 0
    mask[:, -2:] = 0
    with torch.no_grad():
        expected = model(real).logits
        got = model(padded, attention_mask=mask).logits[:, mask[0].bool()]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- every family, form and head (the pads: interior and right, plus left in a second row) ---

from families import FAMILIES, head_config  # noqa: E402

PAD_HEADS = ["Model", "ForCausalLM", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering"]


def _counts_pads_in_window(family, head: str = "ForCausalLM") -> bool:
    """Causal sliding-window attention layers count positions, pads included (transformers' sliding masks and
    caches do): exact for left padding only (checked separately below)."""
    return "sliding_window" in family.tiny and head != "ForMaskedLM"


def _padded_rows(vocab: int = 96):
    """A real row of 10 tokens, and the same tokens with 3 interior pads and 2 right pads (row 0) or 3 left pads
    and 4 right pads (row 1)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randint(3, vocab, (1, 10), generator=g)
    zeros = lambda n: torch.zeros(1, n, dtype=torch.long)  # noqa: E731
    row0 = torch.cat([real[:, :4], zeros(3), real[:, 4:], zeros(2)], 1)
    row1 = torch.cat([zeros(3), real, zeros(2)], 1)
    padded = torch.cat([row0, row1])
    mask = (padded != 0).long()
    return real, padded, mask


def _outputs(model, head, **inputs):
    out = model(**inputs)
    if head == "Model":
        return out.last_hidden_state
    return out.start_logits if head == "ForQuestionAnswering" else out.logits


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent", "auto"])
@pytest.mark.parametrize("head", PAD_HEADS)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_pads_anywhere_leave_every_family_form_and_head_unchanged(family, head, form):
    if _counts_pads_in_window(family, head):
        pytest.skip("sliding-window attention counts pads in its window: left padding only (tested below)")
    torch.manual_seed(0)
    config = head_config(family, head, forward_mode=form, initializer_range=0.2)
    model = family.cls(head)(config).eval()
    real, padded, mask = _padded_rows()
    with torch.no_grad():
        expected = _outputs(model, head, input_ids=real)[0]
        got = _outputs(model, head, input_ids=padded, attention_mask=mask)
    for row in range(2):
        torch.testing.assert_close(got[row][mask[row].bool()], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_sequence_classification_pools_real_tokens_only(family):
    torch.manual_seed(0)
    model = family.cls("ForSequenceClassification")(
        head_config(family, "ForSequenceClassification", bidirectional=True, initializer_range=0.2)
    ).eval()
    real, padded, mask = _padded_rows()
    with torch.no_grad():
        expected = model(real).logits[0]
        got = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(got, expected.expand_as(got), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_right_padded_prefill_continues_as_the_unpadded_one(family):
    """A prefill with right pads, then one-token steps on its cache (the mask grows by 1 per step): the logits of
    the unpadded prompt's continuation, for the fixed-size states and the KV caches of attention layers."""
    if _counts_pads_in_window(family):
        pytest.skip("sliding-window attention counts pads in its window: left padding only (tested below)")
    torch.manual_seed(0)
    model = family.cls("ForCausalLM")(family.config(initializer_range=0.2)).eval()
    real = torch.randint(3, 96, (1, 7))
    padded = torch.cat([real, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = (padded != 0).long()
    steps = torch.randint(3, 96, (1, 4))
    with torch.no_grad():
        want = model(real, use_cache=True)
        got = model(padded, attention_mask=mask, use_cache=True)
        torch.testing.assert_close(got.logits[:, :7], want.logits, rtol=1e-5, atol=1e-5)
        cache_want, cache_got = want.cache, got.cache
        for i in range(steps.shape[1]):
            token = steps[:, i : i + 1]
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            want = model(token, cache=cache_want, use_cache=True)
            got = model(token, attention_mask=mask, cache=cache_got, use_cache=True)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            cache_want, cache_got = want.cache, got.cache


@pytest.mark.parametrize("family", [f for f in FAMILIES if _counts_pads_in_window(f)], ids=lambda f: f.name)
def test_sliding_window_hybrids_are_exact_under_left_padding(family):
    torch.manual_seed(0)
    model = family.cls("ForCausalLM")(family.config(initializer_range=0.2)).eval()
    real = torch.randint(3, 96, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], 1)
    mask = (padded != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits[:, 3:], model(real).logits, rtol=1e-5, atol=1e-5
        )
