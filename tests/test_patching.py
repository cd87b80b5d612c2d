"""Activation patching on the gates: identities (clean z into the clean run, nothing patched), the
known-answer model's answer head, positions, bad input, saving, and the CHG-vs-CMA comparison."""

import pandas as pd
import pytest
import torch

import chg_lens
from chg_lens import ablation, gates, models, patching
from chg_lens.scoring import row_logprobs

from pair_models import known_pairs as _known_pairs
from pair_models import random_pair


def _pair(seed=0, rows=5, width=7):
    """Random pairs; only the clean rows have answers (the corrupted rows' answers are optional)."""
    return random_pair(seed, rows, width, corrupted_answers=False)


def test_patching_identities(tiny_model):
    clean, corrupted = _pair()
    z = patching.clean_z(tiny_model, clean)
    ans = torch.tensor(clean.row_meta["answers"])
    with torch.no_grad():
        plain_clean = row_logprobs(tiny_model, clean.tokens, clean.loss_mask, answers=ans)
        plain_corr = row_logprobs(tiny_model, corrupted.tokens, corrupted.loss_mask, answers=ans)
        # the clean run's own z patched in everywhere reproduces the clean run
        own = row_logprobs(tiny_model, clean.tokens, clean.loss_mask, torch.zeros(2, 4), sources=z, answers=ans)
        # patching nothing (all gates 1, clean z as source) reproduces the corrupted run
        none = row_logprobs(tiny_model, corrupted.tokens, corrupted.loss_mask, gates.ones(tiny_model), sources=z,
                            answers=ans)
    torch.testing.assert_close(own.logprob_sum, plain_clean.logprob_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(own.answer_logits, plain_clean.answer_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none.answer_logits, plain_corr.answer_logits, rtol=1e-6, atol=1e-6)
    res = patching.patch_heads(tiny_model, clean, corrupted)
    assert res.baseline["corrupted"] == pytest.approx(float(plain_corr.logit_diff.mean()), abs=1e-5)
    assert res.baseline["clean"] == pytest.approx(float(plain_clean.logit_diff.mean()), abs=1e-5)
    # one head's patch, by hand
    g = gates.ones(tiny_model)
    g[1, 3] = 0.0
    with torch.no_grad():
        one = row_logprobs(tiny_model, corrupted.tokens, corrupted.loss_mask, g, sources=z, answers=ans)
    i = res.frame.index[(res.frame["layer"] == 1) & (res.frame["head"] == 3)][0]
    torch.testing.assert_close(res.per_prompt[i], one.logit_diff[0] - plain_corr.logit_diff[0], rtol=1e-4, atol=1e-5)
    assert res.effects.shape == (2, 4)
    # with no prefix reuse, same numbers
    plain = patching.patch_heads(tiny_model, clean, corrupted, prefix_reuse=False)
    torch.testing.assert_close(plain.per_prompt, res.per_prompt, rtol=1e-5, atol=1e-5)


def test_positions(tiny_model):
    clean, corrupted = _pair(1)
    last = patching.position_mask(corrupted, "last")
    assert last.sum(1).tolist() == [1] * 5 and last[:, 4].all()
    assert patching.position_mask(corrupted, [-1]).equal(last)
    assert patching.position_mask(corrupted, [2])[:, 2].all()
    # patching before the changed token does nothing: position 1 sees the same prefix in both runs
    early = patching.patch_heads(tiny_model, clean, corrupted, positions=[1], metric="logprob")
    assert early.frame.effect.abs().max() < 1e-5
    at = patching.patch_heads(tiny_model, clean, corrupted, positions=[2], metric="logprob")
    assert at.frame.effect.abs().max() > 1e-4
    with pytest.raises(ValueError, match="positions"):
        patching.position_mask(corrupted, "middle")


def test_answer_head_has_the_largest_indirect_effect(known_model, tmp_path):
    clean, corrupted = _known_pairs()
    res = patching.patch_heads(known_model, clean, corrupted, mediating="significance")
    f = res.frame.set_index("head")
    assert f.effect.idxmax() == 0
    assert f.loc[0, "effect"] > 2.0 and f.loc[0, "mediating"]  # measured 4.39 (logit difference)
    assert f.loc[[1, 2, 3], "effect"].abs().max() < 1e-4  # the distractor head sees the same d_j; 2, 3 write nothing
    assert res.mediating_heads() == [(0, 0)]
    assert res.baseline["clean"] > res.baseline["corrupted"]
    back = patching.PatchResult.load(res.save(tmp_path / "p"))
    assert back.frame.equals(res.frame) and torch.equal(back.per_prompt, res.per_prompt)
    # the sweep agrees: ablating head 0 costs the most
    sweep = ablation.head_sweep(known_model, clean)
    assert sweep.frame.set_index("head").delta_logprob.idxmin() == 0


def test_bad_pairs_fail_early(tiny_model):
    clean, corrupted = _pair()
    short = chg_lens.TaskDataset.from_tokens(corrupted.tokens[:, :6], corrupted.loss_mask[:, :6])
    with pytest.raises(ValueError, match="equal token length|rows"):
        patching.patch_heads(tiny_model, clean, short)
    with pytest.raises(ValueError, match="rows"):
        patching.patch_heads(tiny_model, clean, corrupted.subset([0, 1]))
    with pytest.raises(ValueError, match="answers"):
        patching.patch_heads(tiny_model, corrupted, clean, metric="logit_diff")


def test_compare_chg_cma_welch():
    from scipy import stats

    rng = torch.Generator().manual_seed(0)
    rows = []
    for seed in range(3):
        for l in range(4):
            for h in range(5):
                special = {(3, 0): 0.9, (3, 1): 0.85, (2, 4): 0.95}
                fac = special.get((l, h), float(torch.rand(1, generator=rng)) * 0.5)
                rows.append({"seed": seed, "layer": l, "head": h, "facilitation": fac - 0.05 * seed})
    scores = pd.DataFrame(rows)
    cma = pd.DataFrame({"layer": [l for l in range(4) for _ in range(5)], "head": list(range(5)) * 4})
    cma["effect"] = [1.0 if (l, h) in {(3, 0), (3, 1), (2, 4)} else 0.0 for l, h in zip(cma.layer, cma["head"])]
    cma["mediating"] = cma.effect > 0.5
    cmp = patching.compare_chg_cma(scores, cma)
    assert list(cmp.frame.columns) == ["layer", "head", "facilitation", "effect", "mediating"]
    fmax = scores.groupby(["layer", "head"]).facilitation.max().reset_index().merge(cma, on=["layer", "head"])
    ref = stats.ttest_ind(fmax[fmax.mediating].facilitation, fmax[~fmax.mediating].facilitation, equal_var=False)
    assert cmp.t == pytest.approx(ref.statistic) and cmp.p == pytest.approx(ref.pvalue)
    assert cmp.mean_mediating == pytest.approx(0.9) and cmp.n_mediating == 3 and cmp.t > 3
    assert 2 < cmp.dof < 20 and "Welch" in cmp.summary()


def test_cli_ablate_and_patch_write_results_folders(tmp_path, capsys):
    from chg_lens.cli import main

    from conftest import gpt2_tokenizer, tiny_llama_hf

    folder = tmp_path / "tiny"
    tok = gpt2_tokenizer()
    tiny_llama_hf(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_head=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = models.load_model(str(folder))
    train, _ = chg_lens.tasks.ioi(model, n_prompts=10)
    fit = tmp_path / "fit"
    result = chg_lens.fit_chg(model, train, n_seeds=2, updates=1, reg_updates=1, batch_size=4, task="ioi",
                              progress=False)
    result.meta["model"] = str(folder)
    result.save(fit)
    fig = tmp_path / "fig2"
    assert main(["ablate", "--mode", "figure2", "--chg", str(fit), "--n-prompts", "10", "--n-steps", "3",
                 "--out", str(fig), "--no-progress"]) == 0
    frame = pd.read_parquet(fig / "frame.parquet")
    assert len(frame) == 2 * 3 * 3 and set(frame.score) == {"facilitation", "irrelevance", "interference"}
    assert (frame.delta_logprob == frame.logprob_ablated - frame.logprob_retained).all()
    pat = tmp_path / "patch"
    assert main(["patch", "--model", str(folder), "--task", "ioi", "--n-prompts", "4", "--positions", "last",
                 "--out", str(pat), "--no-progress"]) == 0
    res = patching.PatchResult.load(pat)
    assert res.per_prompt.shape == (8, 4) and res.meta["positions"] == "last" and res.meta["metric"] == "logit_diff"
    assert "ioi/abc" in capsys.readouterr().out
    assert main(["ablate", "--mode", "figure2", "--model", str(folder)]) == 2  # needs --chg


def test_positional_options_still_work_with_a_warning(tiny_model):
    clean, corrupted = _pair()
    new = patching.patch_heads(tiny_model, clean, corrupted, heads=[(0, 1)], positions=[2], metric="logprob")
    with pytest.warns(DeprecationWarning, match="by position"):
        old = patching.patch_heads(tiny_model, clean, corrupted, [(0, 1)], [2], "logprob")
    assert new.frame.equals(old.frame)
