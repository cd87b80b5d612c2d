"""Ablation sweeps: batched = one head at a time, prefix reuse = plain path, mean ablation, sequential
orders, and the paper's Figure 2 signs on the hand-built known-answer model."""

import pytest
import torch

import chg_lens
from chg_lens import ablation, fit_chg, gates, models, scoring
from chg_lens.scoring import row_logprobs

from conftest import known_answer_data


def _data(seed=0, rows=6, width=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 32, (rows, width), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 4:] = True
    mask[0, 6] = False  # rows of different target counts
    data = chg_lens.TaskDataset.from_tokens(tokens, mask)
    data.row_meta["answers"] = torch.randint(4, 32, (rows, 2), generator=g).tolist()
    return data


def test_batched_sweep_equals_one_head_at_a_time(tiny_model):
    data = _data()
    sweep = ablation.head_sweep(tiny_model, data, batch_size=4, rows_per_pass=12)
    ans = torch.tensor(data.row_meta["answers"])
    for i, (l, h) in enumerate(ablation.all_heads(tiny_model)):
        g = gates.ones(tiny_model)
        g[l, h] = 0.0
        with torch.no_grad():
            one = row_logprobs(tiny_model, data.tokens, data.loss_mask, g, answers=ans)
        row = sweep.frame.iloc[i]
        assert (row["layer"], row["head"]) == (l, h)
        assert row.logprob == pytest.approx(float(one.logprob_sum.mean()), abs=1e-5)
        assert row.logit_diff == pytest.approx(float(one.logit_diff.mean()), abs=1e-5)
        assert row.accuracy == pytest.approx(float(one.correct.float().mean()))
    with torch.no_grad():
        base = row_logprobs(tiny_model, data.tokens, data.loss_mask)
    assert sweep.baseline["logprob"] == pytest.approx(float(base.logprob_sum.mean()), abs=1e-5)
    assert sweep.tensor("delta_logprob").shape == (2, 4)
    assert not torch.isnan(sweep.tensor("delta_logprob")).any()


def test_prefix_reuse_equals_plain_path(tiny_model):
    data = _data(1)
    configs = torch.rand(9, 2, 4, generator=torch.Generator().manual_seed(0))
    configs[:5, 0] = 1.0  # these differ from the base only from layer 1 on: they start there
    configs[8] = 1.0      # equal to the base
    means = ablation.mean_z(tiny_model, data)
    a = ablation.score_configs(tiny_model, data, configs, means, prefix_reuse=True, batch_size=4)
    b = ablation.score_configs(tiny_model, data, configs, means, prefix_reuse=False, batch_size=4)
    torch.testing.assert_close(a.logprob_sum, b.logprob_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.answer_logits, b.answer_logits, rtol=1e-5, atol=1e-5)
    assert scoring.first_changed_layer(configs, torch.ones(2, 4))[:5].tolist() == [1] * 5
    # models-level: the residual entering block 1, run from there, gives the same final residual
    hooks = gates.gate_hooks(tiny_model, configs[6])
    with torch.no_grad():
        full = models.final_residual(tiny_model, data.tokens, hooks)
        r = models.residual_at(tiny_model, data.tokens, 1, hooks)
        part = models.final_residual(tiny_model, None, hooks, start_at_layer=1, resid=r)
    torch.testing.assert_close(full, part, rtol=1e-5, atol=1e-5)


def test_mean_ablation_uses_the_mean_z_of_real_positions(tiny_model):
    data = _data(2)
    means = ablation.mean_z(tiny_model, data)
    z = models.cache_z(tiny_model, data.tokens)
    torch.testing.assert_close(means[1], z[1].mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)  # no padding here
    sweep = ablation.head_sweep(tiny_model, data, method="mean")
    g = gates.ones(tiny_model)
    g[1, 2] = 0.0
    with torch.no_grad():
        one = row_logprobs(tiny_model, data.tokens, data.loss_mask, g, sources=means)
    got = sweep.frame.query("layer == 1 and head == 2").logprob.item()
    assert got == pytest.approx(float(one.logprob_sum.mean()), abs=1e-5)
    zero = ablation.head_sweep(tiny_model, data, method="zero")
    assert not torch.allclose(torch.tensor(zero.frame.logprob.values), torch.tensor(sweep.frame.logprob.values))


def test_sequential_orders_are_cumulative(tiny_model):
    data = _data(3)
    fwd = ablation.sequential_ablation(tiny_model, data, order="forward")
    assert fwd.frame[["layer", "head"]].values.tolist()[:3] == [[0, 0], [0, 1], [0, 2]]
    back = ablation.sequential_ablation(tiny_model, data, order="backward")
    assert back.frame[["layer", "head"]].values.tolist()[0] == [1, 3]
    rnd = ablation.sequential_ablation(tiny_model, data, order="random", seed=3, n_steps=5)
    assert len(rnd.frame) == 5 and rnd.frame.step.tolist() == [1, 2, 3, 4, 5]
    given = ablation.sequential_ablation(tiny_model, data, order=[(1, 2), (0, 3)])
    g = gates.ones(tiny_model)
    g[1, 2] = g[0, 3] = 0.0
    with torch.no_grad():
        both = row_logprobs(tiny_model, data.tokens, data.loss_mask, g)
    assert given.frame.logprob.iloc[-1] == pytest.approx(float(both.logprob_sum.mean()), abs=1e-5)
    # all heads off at the last step in every order
    assert fwd.frame.logprob.iloc[-1] == pytest.approx(back.frame.logprob.iloc[-1], abs=1e-5)
    with pytest.raises(ValueError, match="order"):
        ablation.sequential_ablation(tiny_model, data, order="sideways")
    with pytest.raises(ValueError, match="outside"):
        ablation.head_sweep(tiny_model, data, heads=[(5, 0)])
    with pytest.raises(ValueError, match="method"):
        ablation.head_sweep(tiny_model, data, method="resample")


def test_figure2_signs_on_the_known_answer_model(known_model, tmp_path):
    result = fit_chg(known_model, known_answer_data(64), n_seeds=2, updates=30, reg_updates=30,
                     batch_size=16, progress=False)
    val = known_answer_data(32, seed=1)
    fig = ablation.figure2(known_model, val, result)
    f = fig.frame
    assert list(f.columns[:8]) == ["score", "seed", "step", "layer", "head", "logprob_retained",
                                   "logprob_ablated", "delta_logprob"]
    assert sorted(f.seed.unique().tolist()) == [0, 1] and f.step.max() == 4
    first = f[f.step == 1].set_index(["score", "seed"])
    # facilitation: head 0 first, ablating it costs log-prob; interference: head 1 first, ablating it helps
    assert (first.loc["facilitation", "head"] == 0).all()
    assert (first.loc["facilitation", "delta_logprob"] < -1.0).all()
    assert (first.loc["interference", "head"] == 1).all()
    assert (first.loc["interference", "delta_logprob"] > 0.5).all()
    assert set(first.loc["irrelevance", "head"]) <= {2, 3}
    assert first.loc["irrelevance", "delta_logprob"].abs().max() < 1e-4
    # irrelevant heads stay ~0 for as long as only irrelevant heads are toggled (first two steps)
    irr = f[(f.score == "irrelevance") & (f.step <= 2)]
    assert irr.delta_logprob.abs().max() < 1e-4
    path = fig.save(tmp_path / "fig2")
    back = ablation.AblationResult.load(path)
    assert back.frame.equals(f) and back.meta == fig.meta
    one = ablation.figure2(known_model, val, result, seeds=1, scores=["facilitation"], n_steps=2)
    assert len(one.frame) == 2 and one.frame.seed.unique().tolist() == [1]


def test_rows_per_pass_is_the_new_name_of_max_rows_per_pass(tiny_model):
    data = _data()
    new = ablation.head_sweep(tiny_model, data, batch_size=4, rows_per_pass=12)
    with pytest.warns(DeprecationWarning, match="rows_per_pass"):
        old = ablation.head_sweep(tiny_model, data, batch_size=4, max_rows_per_pass=12)
    assert new.frame.equals(old.frame)
    with pytest.raises(TypeError, match="old name"):
        ablation.head_sweep(tiny_model, data, rows_per_pass=12, max_rows_per_pass=12)


def test_positional_options_still_work_with_a_warning(tiny_model):
    data = _data()
    new = ablation.head_sweep(tiny_model, data, heads=[(0, 1), (1, 2)], method="zero")
    with pytest.warns(DeprecationWarning, match="by position"):
        old = ablation.head_sweep(tiny_model, data, [(0, 1), (1, 2)], "zero")
    assert new.frame.equals(old.frame)
