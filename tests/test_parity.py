"""Architecture parity: chg_lens's scoring path equals each model's own forward.

For every decoder family (a tiny random Hugging Face model, unembedding scaled so soft-caps and
logit scalings bite) and, on TransformerLens 3.x, every ``HookedTransformerConfig`` variant:
(a) ungated chg_lens log-probs == the model's own ``log_softmax`` to 1e-4 (fp32);
(b) gate 0 (and 0.5) on a head == scaling that head's slice of the attention output projection's
    input in the Hugging Face model (an independent forward pre-hook; on 3.x configs, the head's
    ``W_O`` rows scaled in a copy of the model);
(c) gates of 1 change nothing.
Families a TransformerLens line cannot run are listed in docs/models.md with their error; a test
checks that exactly those fail.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import parity_models as pm
from chg_lens import models

TOL = 1e-4
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
LINE = f"{models.TL_MAJOR}.x"


def documented_unsupported() -> dict[str, str]:
    """``family -> error`` for this TransformerLens line, from docs/models.md's table."""
    out = {}
    for row in DOCS.read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*([\d.x, ]+)\s*\|\s*(.+?)\s*\|\s*$", row)
        if m and LINE in [s.strip() for s in m.group(2).split(",")]:
            out[m.group(1)] = m.group(3).strip("` ")
    return out


UNSUPPORTED = documented_unsupported()
SUPPORTED = [f for f in pm.FAMILIES if f not in UNSUPPORTED and pm.available(f)]


def check(errors: dict[str, float]) -> None:
    assert errors["gate0_effect"] > 1.0, "the ablated heads must matter, or (b) proves nothing"
    for k in ("ungated", "gate0", "gate_half", "gate1"):
        assert errors[k] < TOL, f"{k}: max abs log-prob error {errors[k]:.3g}"


@pytest.mark.parametrize("family", SUPPORTED)
def test_hf_family_parity(family):
    check(pm.hf_parity(family))


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_documented_unsupported_families_fail_with_the_documented_error(family):
    with pytest.raises(Exception) as info:
        pm.hf_parity(family)
    assert f"{info.type.__name__}: {info.value}".startswith(UNSUPPORTED[family])


def test_the_suite_covers_the_families_the_issue_names():
    named = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "llama_gqa", "mistral", "mixtral", "qwen2",
             "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3", "olmo", "stablelm"}
    assert named <= set(pm.FAMILIES)
    if models.TL_MAJOR >= 4:
        assert named <= set(SUPPORTED) | set(UNSUPPORTED)
        assert {"gemma2", "gemma3", "cohere", "granite", "mixtral"} <= set(SUPPORTED)  # caps, scalings, MoE


@pytest.mark.skipif(models.TL_MAJOR >= 4, reason="HookedTransformerConfig models are TransformerLens 3.x")
@pytest.mark.parametrize("name", list(pm.tl3_configs()))
def test_hooked_transformer_config_parity(name):
    check(pm.tl3_parity(name))


def test_without_the_output_transform_gemma2_is_caught_and_scored_by_its_full_forward(monkeypatch):
    """Drop the soft-cap from chg_lens's readout: the readout check must see the mismatch (many
    nats), warn, and score through the full forward, which is still exact."""
    if "gemma2" not in SUPPORTED:
        pytest.skip(f"gemma2 does not run on TransformerLens {LINE}")
    from conftest import word_tokenizer

    monkeypatch.setattr(models.runners, "output_transform", lambda model, logits: logits)
    hf = pm.hf_model("gemma2")
    toks = pm.tokens()
    ref = pm.hf_logprobs(hf, toks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.load_model(hf, tokenizer=word_tokenizer(pm.words()))
    with torch.no_grad():
        uncapped = models.unembed(model, models.final_residual(model, toks)).float().log_softmax(-1)
    assert float((uncapped - ref).abs().max()) > 1.0
    with pytest.warns(UserWarning, match="full forward"):
        assert not models.readout_is_exact(model)
    ours = pm.chg_logprobs(model, toks, torch.stack([pm.gate_tensor({})]))
    assert float((ours[0] - ref).abs().max()) < TOL


def test_a_readout_chg_lens_cannot_reproduce_falls_back_to_the_full_forward_and_warns(tiny_model, monkeypatch):
    """A model whose forward does something after the unembedding that TransformerLens does not
    declare (here: its logits doubled) is scored through its full forward, with one warning."""
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda *args, **kwargs: forward(*args, **kwargs) * 2.0)
    models._READOUT.pop(tiny_model, None)
    try:
        toks = pm.tokens(rows=2, width=6) % models.tokenizer(tiny_model).vocab_size
        with pytest.warns(UserWarning, match="full forward"):
            assert not models.readout_is_exact(tiny_model)
        ours = pm.chg_logprobs(tiny_model, toks, torch.ones(1, models.n_layers(tiny_model), models.n_heads(tiny_model)))
        with torch.no_grad():
            own = tiny_model(toks).float().log_softmax(-1)
        assert float((ours[0] - own).abs().max()) < TOL
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model
            models.readout_is_exact(tiny_model)
    finally:
        monkeypatch.undo()
        models._READOUT.pop(tiny_model, None)
    assert models.readout_is_exact(tiny_model)


def test_row_logprobs_and_answer_logits_use_the_same_output_path():
    """The soft-capped Gemma 3: target log-probs and answer logits of row_logprobs both equal HF's."""
    from chg_lens.scoring import row_logprobs
    from conftest import word_tokenizer

    if "gemma3" not in SUPPORTED:
        pytest.skip(f"gemma3 does not run on TransformerLens {LINE}")
    hf = pm.hf_model("gemma3")
    toks = pm.tokens()
    with torch.no_grad():
        ref_logits = hf(toks).logits.float()
    ref = ref_logits.log_softmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.load_model(hf, tokenizer=word_tokenizer(pm.words()))
    mask = torch.zeros_like(toks, dtype=torch.bool)
    mask[:, 4:] = True
    answers = torch.tensor([[5, 6], [7, 8], [9, 10]])
    out = row_logprobs(model, toks, mask, answers=answers)
    expect = ref[:, 3:-1].gather(-1, toks[:, 4:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(out.logprob_sum[0], expect, atol=TOL * 10, rtol=0)
    torch.testing.assert_close(out.answer_logits[0], ref_logits[:, 3].gather(-1, answers), atol=TOL * 10, rtol=0)
    assert float(ref_logits.abs().max()) <= 5.0 + 1e-4 and float(ref_logits.abs().max()) > 4.0  # the cap bites


@pytest.mark.skipif(models.TL_MAJOR >= 4, reason="HookedTransformerConfig models are TransformerLens 3.x")
def test_fit_runs_on_an_attention_only_model_without_norms():
    """Issue #13's crash: 'HookedTransformer' object has no attribute 'ln_final'."""
    import chg_lens
    from chg_lens.chg import fit_chg

    model = pm.tl3_model("attn_only,norm=None")
    assert not hasattr(model, "ln_final")
    toks = pm.tokens(rows=8, width=6)
    mask = torch.zeros_like(toks, dtype=torch.bool)
    mask[:, 4:] = True
    data = chg_lens.TaskDataset.from_tokens(toks, mask, name="toy")
    result = fit_chg(model, data, n_seeds=1, updates=3, reg_updates=2, batch_size=4, progress=False)
    assert torch.isfinite(result.logits["g0"]).all()
