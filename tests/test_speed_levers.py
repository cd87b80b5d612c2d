"""Every speed lever of the fit equals the plain path, to a stated tolerance (issue 8).

Levers and their plain paths:

* mixed precision (``autocast="bf16"``) vs float32: log-probs within 0.05 nats (bf16 keeps ~3
  significant digits), gate gradients pointing the same way (cosine > 0.99), the same fitted roles;
* logits only at target positions vs log-softmax over the full logits at every position: 1e-5;
* gate configurations (masks, G+ and G-) batched into one pass vs one pass each: 1e-5 (and the
  joint G+/G- fit vs separate fits: tests/test_chg.py);
* trimming right padding per batch (the data pipeline: tensor indexing, no per-row Python) vs the
  padded batch: 1e-5;
* no weight gradients: none are computed, in either precision.

Speed itself is measured in benchmarks/ (no timed assertions here).
"""

import pytest
import torch

from chg_lens import fit_chg, models
from chg_lens.scoring import evaluate, row_logprobs

from conftest import known_answer_data

TOL_BF16 = 0.05  # nats per row


def _batch(model, rows=4, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, model.cfg.d_vocab, (rows, pos), generator=g)
    mask = torch.zeros_like(toks, dtype=torch.bool)
    mask[:, 3:] = True  # several targets per row: a long-target row
    mask[0, 3:-1] = False  # and a last-token row
    return toks, mask


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)


def test_bf16_autocast_log_probs_and_gate_gradients_match_float32(tiny_model):
    toks, mask = _batch(tiny_model)
    base = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(1))
    out = {}
    for mode in (None, "bf16"):
        g = base.clone().requires_grad_(True)
        with models.frozen(tiny_model):
            r = row_logprobs(tiny_model, toks, mask, g, autocast=mode)
            r.nll.sum().backward()
        out[mode] = (r.logprob_sum.detach(), g.grad)
    assert out["bf16"][0].dtype == torch.float32  # the loss is always float32
    torch.testing.assert_close(out["bf16"][0], out[None][0], rtol=0, atol=TOL_BF16)
    assert _cos(out["bf16"][1], out[None][1]) > 0.99
    assert not torch.equal(out["bf16"][0], out[None][0])  # it really ran in bf16


def test_bf16_autocast_in_evaluate_matches_float32(tiny_model):
    from chg_lens.data import TaskDataset

    toks, mask = _batch(tiny_model, rows=6)
    data = TaskDataset.from_tokens(toks, mask, pad_token_id=3)
    cfg = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(3))
    plain = evaluate(tiny_model, data, cfg, batch_size=4)
    fast = evaluate(tiny_model, data, cfg, batch_size=4, autocast="bf16")
    torch.testing.assert_close(fast.logprob_sum, plain.logprob_sum, rtol=0, atol=TOL_BF16)


def test_bf16_fit_finds_the_same_roles_as_float32(known_model):
    data = known_answer_data(32)
    kw = dict(n_seeds=1, updates=40, reg_updates=40, batch_size=8, progress=False)
    plain = fit_chg(known_model, data, **kw)
    fast = fit_chg(known_model, data, autocast="bf16", **kw)
    assert fast.meta["autocast"] == "bf16" and plain.meta["autocast"] is None
    for stage in ("g0", "g_plus", "g_minus"):
        assert (fast.gates[stage] - plain.gates[stage]).abs().max() < 0.1, stage
    assert fast.scores()["role"].tolist() == plain.scores()["role"].tolist()
    assert not any(p.grad is not None for p in known_model.parameters())


def test_bad_autocast_value_fails_before_any_work(tiny_model):
    toks, mask = _batch(tiny_model)
    from chg_lens.data import TaskDataset

    with pytest.raises(ValueError, match="autocast"):
        fit_chg(tiny_model, TaskDataset.from_tokens(toks, mask), autocast="int8", progress=False)
    with pytest.raises(ValueError, match="autocast"):
        row_logprobs(tiny_model, toks, mask, autocast="float32")


def test_target_positions_only_equals_full_logits_of_batched_configs(tiny_model):
    toks, mask = _batch(tiny_model)
    cfg = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(4))
    got = row_logprobs(tiny_model, toks, mask, cfg)
    from chg_lens import gates

    for k in range(3):  # plain path: one config per pass, full logits at every position
        lp = models.run_with_hooks(tiny_model, toks, gates.gate_hooks(tiny_model, cfg[k])).log_softmax(-1)
        tgt = lp[:, :-1].gather(-1, toks[:, 1:, None])[..., 0]
        want = (tgt * mask[:, 1:]).sum(1)
        torch.testing.assert_close(got.logprob_sum[k], want, rtol=1e-5, atol=1e-5)


def test_trimming_padding_changes_nothing(tiny_model):
    toks, mask = _batch(tiny_model)
    padded = torch.cat([toks, torch.full((toks.shape[0], 5), 3)], dim=1)
    pmask = torch.cat([mask, torch.zeros(mask.shape[0], 5, dtype=torch.bool)], dim=1)
    cfg = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(5))
    a = row_logprobs(tiny_model, toks, mask, cfg, autocast="bf16")
    b = row_logprobs(tiny_model, padded, pmask, cfg, autocast="bf16")
    torch.testing.assert_close(a.logprob_sum, b.logprob_sum, rtol=1e-5, atol=1e-5)
