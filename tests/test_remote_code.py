"""A saved folder loads with trust_remote_code in a Python where hf_extras cannot be imported."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_without_hf_extras
from families import FAMILIES, HEADS


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_remote_code_load_without_hf_extras(family, tmp_path):
    model = family.cls("ForCausalLM")(family.config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModelForSeq2SeqLM"} | {auto.__name__ for auto in HEADS.values()}
    ids = torch.randint(7, 96, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids, "logits": expected, "generated": generated}, tmp_path / "expected.pt")

    result = run_without_hf_extras(
        f"""
        import torch
        try:
            import hf_extras
            raise SystemExit("hf_extras must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        ref = torch.load("{tmp_path}/expected.pt")
        model = AutoModelForCausalLM.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True).eval()
        assert "hf_extras" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=0, atol=0)
        assert torch.equal(model.generate(ref["ids"], max_new_tokens=5, do_sample=False, pad_token_id=0), ref["generated"])
        clf = AutoModelForSequenceClassification.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True, num_labels=3)
        assert clf(ref["ids"]).logits.shape == (1, 3)
        # warm start: the encoder-decoder built from the causal LM's folder, through the folder's own code
        from transformers import AutoModelForSeq2SeqLM
        s2s = AutoModelForSeq2SeqLM.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True)
        assert type(s2s).__name__.endswith("ForConditionalGeneration") and "hf_extras" not in type(s2s).__module__
        assert torch.equal(s2s.shared.weight, model.model.embed_tokens.weight)
        for stack in (s2s.encoder, s2s.decoder):
            state = stack.state_dict()
            for key, value in model.model.state_dict().items():
                assert torch.equal(state[key], value), key
        assert s2s.generate(ref["ids"], max_new_tokens=3, min_new_tokens=3).shape == (1, 4)
        print("REMOTE_OK", type(model).__name__)
        """,
        cwd=str(tmp_path),
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def test_push_to_hub_offline_fails_with_the_hub_error(tmp_path, monkeypatch):
    """Offline, push_to_hub fails in huggingface_hub/transformers' own code, after our save_pretrained ran cleanly."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    import hf_extras

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = hf_extras.RetNetForCausalLM(FAMILIES[0].config())
    with pytest.raises((OfflineModeIsEnabled, OSError, ValueError)) as info:
        model.push_to_hub("hf-extras-test/never-created", token="hf_dummy")
    raised_in = str(info.traceback[-1].path)
    assert "hf_extras" not in raised_in, raised_in
    print(type(info.value).__name__, raised_in)
