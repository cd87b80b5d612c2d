"""patching.symbolic_patching (advertised in the README): Yang et al.'s three ABA/ABB screens."""

from __future__ import annotations

import pandas as pd
import torch

from chg_lens import models, patching


def test_symbolic_patching_runs_the_three_screens_with_the_significance_rule(tiny_gpt2_vocab_model):
    model = tiny_gpt2_vocab_model
    n_heads = models.n_layers(model) * models.n_heads(model)
    res = patching.symbolic_patching(model, n_prompts=6, seed=2, alpha=0.2)
    assert list(res) == list(patching.SYMBOLIC_KINDS)
    for kind, r in res.items():
        clean, corrupted, pos = patching.symbolic_pairs(model, kind, n_prompts=6, seed=2)
        # logit difference: the clean answer against the answer the corrupted prompt implies (another word)
        assert all(a != b for a, b in clean.row_meta["answers"]) and not torch.equal(clean.tokens, corrupted.tokens)
        if kind == "abstraction":  # patched where each of the 4 examples shows the rule
            assert pos.sum(dim=1).tolist() == [4] * 6
        else:
            assert pos == "last"
        want = patching.patch_heads(model, clean, corrupted, positions=pos, metric="logit_diff",
                                    mediating="significance", alpha=0.2)
        assert r.meta["kind"] == kind and r.meta["mediating_rule"] == "significance" and r.meta["alpha"] == 0.2
        assert len(r.frame) == n_heads and r.meta["n_rows"] == 6
        torch.testing.assert_close(r.per_prompt, want.per_prompt, rtol=0, atol=0)
        # significance: one-sided p below alpha / n_heads (Bonferroni), and nothing else
        assert r.frame["mediating"].tolist() == (r.frame["p"] < 0.2 / n_heads).tolist()
    frame = patching.symbolic_frame(res)
    assert len(frame) == n_heads
    long = pd.concat([r.frame.assign(kind=k) for k, r in res.items()])
    best = long.groupby(["layer", "head"])["effect"].max().to_numpy()
    assert frame["effect"].to_numpy().tolist() == best.tolist()  # the largest effect over kinds
    assert set(frame["head_type"]) <= {*patching.SYMBOLIC_KINDS, "insignificant"}
    assert (frame["mediating"] == (frame["head_type"] != "insignificant")).all()
