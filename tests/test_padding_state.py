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
