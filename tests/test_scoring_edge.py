"""Checks at the edge, trust inside (issue 27 item 2): a public call checks the model and each data
set once and resolves the precision once, however many chunks of rows it scores; the engine it runs
on (``scoring.Context`` and the unchecked functions) gives the same numbers as the checked calls."""

from __future__ import annotations

import collections
import dataclasses
import sys

import pytest
import torch

from chg_lens import ablation, checks, gates, models, patching, scoring
from chg_lens.data import TaskDataset

COUNTED = [(models, "as_model"), (models, "check_model"), (TaskDataset, "check_model"),
           (models, "resolve_autocast"), (gates, "as_config_gates"), (checks, "gate_tensor")]


def _pair(n_rows=12, width=6, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, vocab, (n_rows, width), generator=g)
    clean[:, 0] = 1
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, vocab, (n_rows,), generator=g)
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    mask[:, -1] = True
    mask[: n_rows // 2, -2] = True  # two targets in half the rows
    answers = torch.stack([clean[:, -1], (clean[:, -1] - 3) % (vocab - 4) + 4], dim=1).tolist()
    out = []
    for t in (clean, corrupted):
        d = TaskDataset.from_tokens(t, mask, pad_token_id=3)
        d.row_meta["answers"] = answers
        out.append(d)
    return out


def _label(owner, name: str) -> str:
    return f"{owner.__name__.rsplit('.', 1)[-1]}.{name}"   # models.as_model, TaskDataset.check_model, ...


def _holders(owner, name: str) -> list:
    """``owner`` and, for a package (``chg_lens.models``), each of its modules that binds the same object:
    a call inside the package looks the name up in its own module, so the counter goes there too."""
    original = owner.__dict__[name]
    prefix = getattr(owner, "__name__", "") + "."
    return [owner] + [m for m in list(sys.modules.values()) if m is not owner and m is not None
                      and getattr(m, "__name__", "").startswith(prefix) and m.__dict__.get(name) is original]


def _counts(monkeypatch, call) -> dict[str, int]:
    counts: collections.Counter = collections.Counter()
    with monkeypatch.context() as mp:
        for owner, name in COUNTED:
            original = owner.__dict__[name]
            label = _label(owner, name)

            def wrapper(*args, _original=original, _label=label, **kwargs):
                counts[_label] += 1
                return _original(*args, **kwargs)

            for holder in _holders(owner, name):
                mp.setattr(holder, name, wrapper)
        call()
    return {_label(o, n): counts[_label(o, n)] for o, n in COUNTED}


# Once per public call: the model (as_model -> check_model), each data set, the precision (resolved
# when the context is built, and once more where the result records it: models.describe_precision).
def _once(n_data: int) -> dict[str, int]:
    return {"models.as_model": 1, "models.check_model": 1, "TaskDataset.check_model": n_data,
            "models.resolve_autocast": 2, "gates.as_config_gates": 0, "checks.gate_tensor": 0}


@pytest.mark.parametrize("batch_size", [4, 12])
def test_patch_heads_checks_once_per_call(tiny_model, monkeypatch, batch_size):
    clean, corrupted = _pair()
    got = _counts(monkeypatch, lambda: patching.patch_heads(tiny_model, clean, corrupted, batch_size=batch_size))
    assert got == _once(2)  # the same for 1 chunk of rows and 3: nothing is re-checked per chunk or pass


@pytest.mark.parametrize("batch_size", [4, 12])
def test_sweeps_check_once_per_call(tiny_model, monkeypatch, batch_size):
    data, other = _pair()
    assert _counts(monkeypatch, lambda: ablation.head_sweep(tiny_model, data, batch_size=batch_size)) == _once(1)
    # mean ablation over a reference: the reference is a second data set, checked once too
    got = _counts(monkeypatch, lambda: ablation.sequential_ablation(tiny_model, data, method="mean", reference=other,
                                                                    batch_size=batch_size))
    assert got == _once(2)
    base = torch.full((2, 4), 0.5)
    got = _counts(monkeypatch, lambda: ablation.head_sweep(tiny_model, data, base=base, batch_size=batch_size))
    assert got == {**_once(1), "checks.gate_tensor": 1}  # the user's base, once


def test_score_configs_and_row_logprobs_check_once(tiny_model, monkeypatch):
    data, _ = _pair()
    configs = torch.rand(5, 2, 4, generator=torch.Generator().manual_seed(1))
    got = _counts(monkeypatch, lambda: scoring.score_configs(tiny_model, data, configs, batch_size=4))
    assert got == {**_once(1), "models.resolve_autocast": 1, "gates.as_config_gates": 1, "checks.gate_tensor": 1}
    got = _counts(monkeypatch, lambda: scoring.evaluate(tiny_model, data, configs, batch_size=4))
    assert got == {**_once(1), "models.resolve_autocast": 1, "gates.as_config_gates": 1, "checks.gate_tensor": 1}
    # row_logprobs takes tokens, not a data set: the precision and the gates' shape, once
    got = _counts(monkeypatch, lambda: scoring.row_logprobs(tiny_model, data.tokens, data.loss_mask, configs))
    assert got == {"models.as_model": 0, "models.check_model": 0, "TaskDataset.check_model": 0,
                   "models.resolve_autocast": 1, "gates.as_config_gates": 1, "checks.gate_tensor": 0}
    ctx = scoring.context(tiny_model, data)
    got = _counts(monkeypatch, lambda: scoring.row_logprobs_unchecked(ctx, data.tokens, data.loss_mask, configs))
    assert sum(got.values()) == 0  # the engine trusts its context


def test_unchecked_pass_equals_the_checked_one(tiny_model):
    data, _ = _pair()
    configs = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(2))
    ctx = scoring.context(tiny_model, data)
    ans = torch.tensor(data.row_meta["answers"])
    with torch.no_grad():
        for g in (configs, configs[1], None):
            a = scoring.row_logprobs(tiny_model, data.tokens, data.loss_mask, g, answers=ans)
            b = scoring.row_logprobs_unchecked(ctx, data.tokens, data.loss_mask, g, answers=ans)
            assert torch.equal(a.logprob_sum, b.logprob_sum) and torch.equal(a.correct, b.correct)
            assert torch.equal(a.answer_logits, b.answer_logits)
            assert a.logprob_sum.shape == (1 if g is None or g.ndim == 2 else 3, 12)
    # differentiable in the gates, as a fit needs it
    g = torch.full((2, 2, 4), 0.7, requires_grad=True)
    scoring.row_logprobs_unchecked(ctx, data.tokens[:4], data.loss_mask[:4], g).nll.sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_context_holds_what_was_checked(tiny_model):
    data, _ = _pair()
    ctx = scoring.context(tiny_model, data, None)
    assert (ctx.n_layers, ctx.n_heads, ctx.d_vocab, ctx.autocast) == (2, 4, 32, None)
    assert ctx.model is tiny_model and ctx.device == models.device(tiny_model)
    assert scoring.context(tiny_model, autocast="bf16").autocast == "bf16"
    assert ctx.precision_meta == models.precision_meta(tiny_model, "off")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.autocast = "bf16"
    bad = TaskDataset.from_tokens(torch.tensor([[1, 40, 5]]), torch.tensor([[False, False, True]]), pad_token_id=3)
    with pytest.raises(ValueError, match="token"):
        scoring.context(tiny_model, data, bad)
    with pytest.raises(ValueError, match="autocast"):
        scoring.context(tiny_model, data, autocast="fp64")
    with pytest.raises(TypeError, match="TaskDataset"):
        scoring.context(tiny_model, data.tokens)
    with pytest.raises(TypeError, match="TransformerLens"):
        scoring.context(torch.nn.Linear(2, 2))


def test_bf16_engine_equals_models_autocast(tiny_model):
    """ctx.precision() enters the autocast models.autocast enters: the same logits, bit for bit."""
    data, _ = _pair()
    ctx = scoring.context(tiny_model, autocast="bf16")
    g = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = scoring.row_logprobs_unchecked(ctx, data.tokens, data.loss_mask, g)
        tokens = data.tokens.repeat(2, 1)
        rows, pos = data.loss_mask[:, 1:].nonzero(as_tuple=True)
        with models.autocast(tiny_model, "bf16"):
            logits = models.logits_at(tiny_model, tokens, [(rows, pos)], gates.gate_hooks(tiny_model, g), lead=2)[0]
    logits = logits.float()
    lp = logits.gather(-1, data.tokens[rows, pos + 1].expand(2, -1).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    want = torch.zeros(2, 12).index_add(1, rows, lp)
    assert torch.equal(a.logprob_sum, want)
    assert a.logprob_sum.dtype == torch.float32 and not torch.allclose(
        a.logprob_sum, scoring.row_logprobs(tiny_model, data.tokens, data.loss_mask, g).logprob_sum, atol=0, rtol=0)
