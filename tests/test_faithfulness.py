"""Faithfulness curves: equal to a plain TransformerLens-hook keep-top-k computation; CPR and CMD
by hand; rankings from every result type; bad rankings fail before any pass; saving."""

import numpy as np
import pytest
import torch

import chg_lens
from chg_lens import faithfulness as faith_mod
from chg_lens import models, patching
from chg_lens.faithfulness import default_grid, faithfulness, head_order, head_scores

import parity_models
from conftest import word_tokenizer
from pair_models import (CIRCUIT, PAD, circuit_hf, greedy_pair, known_pairs, mean_z_by_hand, plain_metric, plain_z,
                         ragged_pair)


@pytest.fixture(scope="module")
def gpt2_model():
    return models.load_model(parity_models.hf_model("gpt2"), tokenizer=word_tokenizer(parity_models.words()))


@pytest.fixture(scope="module")
def llama_model():
    return models.load_model(parity_models.hf_model("llama_gqa"), tokenizer=word_tokenizer(parity_models.words()))


SCALE = {}


def plain_keep_top_k(model, data, keep, metric, source):
    """The metric (mean over rows) with the heads outside ``keep`` ([layers, heads] bool) replaced by
    ``source`` (per layer: a tensor broadcastable to z, or 0.0), by plain TransformerLens hooks on
    hook_z; the metric from the model's own full logits. ``SCALE[metric]`` keeps the size of the
    numbers it is computed from (for logit_diff: the largest logit), the unit of the tolerance."""

    def replace(layer):
        def hook(z, hook):
            z = z.clone()
            drop = ~keep[layer]
            src = source[layer]
            src = torch.as_tensor(src, dtype=z.dtype).expand_as(z) if not isinstance(src, torch.Tensor) or \
                src.ndim < 4 else src[:, : z.shape[1]]
            z[:, :, drop] = src.expand_as(z)[:, :, drop]
            return z
        return hook

    L = model.cfg.n_layers
    with torch.no_grad():
        logits = model.run_with_hooks(data.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", replace(l)) for l in range(L)])
    if metric == "accuracy":
        rows, pos = data.loss_mask[:, 1:].nonzero(as_tuple=True)
        hit = (logits[rows, pos].argmax(-1) == data.tokens[rows, pos + 1]).long()
        n_hit = torch.zeros(len(data), dtype=torch.long).index_add(0, rows, hit)
        return float((n_hit == data.loss_mask.sum(1)).float().mean())
    value = float(plain_metric(logits, data, metric).double().mean())
    size = float(logits.abs().max()) if metric == "logit_diff" else abs(value)
    SCALE[metric] = max(SCALE.get(metric, 1.0), size)
    return value


def _tol(metric):
    """float32: 1e-6 in units of the numbers the metric comes from (measured <= 1e-7 of them)."""
    return 1e-6 * SCALE.get(metric, 1.0)


@pytest.mark.parametrize("family,ablation,metric", [
    ("llama_model", "mean", "logprob"), ("llama_model", "zero", "logit_diff"), ("gpt2_model", "corrupted", "logprob"),
    ("gpt2_model", "mean", "accuracy"), ("gpt2_model", "zero", "prob"),
])
def test_faithfulness_equals_plain_hook_keep_top_k(family, ablation, metric, request):
    model = request.getfixturevalue(family)
    data, corrupted = ragged_pair(0, rows=6)
    if metric in ("accuracy", "prob"):  # the model's own greedy targets: accuracy 1 when all heads are kept
        corrupted, data = greedy_pair(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.randn(L, H, generator=torch.Generator().manual_seed(1))
    grid = [1, 3, 5]
    res = faithfulness(model, data, {"given": scores, "random": None}, n_heads=grid, n_random=2, seed=3,
                       ablation=corrupted if ablation == "corrupted" else ablation, metric=metric, batch_size=4,
                       rows_per_pass=8)
    source = {"mean": mean_z_by_hand(model, data), "zero": [0.0] * L,
              "corrupted": plain_z(model, corrupted.tokens)}[ablation]
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices
    m_all = plain_keep_top_k(model, data, torch.ones(L, H, dtype=torch.bool), metric, source)
    m_none = plain_keep_top_k(model, data, torch.zeros(L, H, dtype=torch.bool), metric, source)
    assert abs(m_all - m_none) > 1e-3  # the ablation matters
    assert res.baseline["all"] == pytest.approx(m_all, abs=_tol(metric))
    assert res.baseline["none"] == pytest.approx(m_none, abs=_tol(metric))
    f = res.frame[res.frame.method == "given"].set_index("k")
    assert f.index.tolist() == [0, 1, 3, 5, L * H]
    for k in [0, 1, 3, 5, L * H]:
        keep = torch.zeros(L * H, dtype=torch.bool)
        keep[order[:k]] = True
        m = plain_keep_top_k(model, data, keep.reshape(L, H), metric, source)
        assert f.loc[k, "metric"] == pytest.approx(m, abs=_tol(metric))
        assert f.loc[k, "normalized"] == pytest.approx((m - m_none) / (m_all - m_none),
                                                       abs=3 * _tol(metric) / abs(m_all - m_none))
        assert f.loc[k, "fraction"] == k / (L * H)
    # random: the mean over its seeded orders
    gen = torch.Generator().manual_seed(3)
    orders = [torch.randperm(L * H, generator=gen) for _ in range(2)]
    r = res.frame[res.frame.method == "random"].set_index("k")
    for k in grid:
        ms = []
        for o in orders:
            keep = torch.zeros(L * H, dtype=torch.bool)
            keep[o[:k]] = True
            ms.append(plain_keep_top_k(model, data, keep.reshape(L, H), metric, source))
        assert r.loc[k, "metric"] == pytest.approx(float(np.mean(ms)), abs=_tol(metric))


def test_cpr_and_cmd_are_trapezoid_areas_by_hand(llama_model, tmp_path):
    data, _ = ragged_pair(1)
    scores = torch.arange(8.0).reshape(2, 4)
    res = faithfulness(llama_model, data, {"up": scores, "down": -scores}, ablation="zero", n_heads=[2, 4, 6])
    assert list(res.frame.columns) == ["method", "k", "fraction", "metric", "normalized"]
    for method in ("up", "down"):
        part = res.frame[res.frame.method == method].sort_values("k")
        x, y = part.fraction.to_numpy(), part.normalized.to_numpy()
        assert x.tolist() == [0, 0.25, 0.5, 0.75, 1.0] and y[0] == 0 and y[-1] == pytest.approx(1.0)
        cpr = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(4))
        cmd = sum((x[i + 1] - x[i]) * (abs(1 - y[i + 1]) + abs(1 - y[i])) / 2 for i in range(4))
        assert res.cpr()[method] == pytest.approx(cpr, abs=1e-12)
        assert res.cmd()[method] == pytest.approx(cmd, abs=1e-12)
    assert list(res.cpr().index) == ["up", "down"] and res.cpr().name == "cpr" and res.cmd().name == "cmd"
    # "up" keeps 7, 6 first (layer 1, heads 3 and 2): ranks are by score, highest first
    assert head_order(scores)[:2].tolist() == [7, 6]
    back = chg_lens.load(res.save(tmp_path / "faith"))
    assert isinstance(back, faith_mod.FaithfulnessResult) and back.frame.equals(res.frame)
    assert back.baseline == res.baseline and back.meta == res.meta and torch.equal(back.scores["up"], scores)
    assert back.cpr().equals(res.cpr())


def test_default_grid():
    assert default_grid(8) == list(range(9))
    assert default_grid(32) == list(range(33))
    g = default_grid(270)
    assert g[:17] == list(range(17)) and g[-1] == 270 and len(g) == len(set(g)) and g == sorted(g)
    assert 135 in g and len(g) < 60


def test_ties_keep_layer_head_order():
    scores = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 1.0]])
    assert head_order(scores).tolist() == [1, 2, 3, 0, 5, 4]


def test_head_scores_from_results(llama_model):
    data, corrupted = ragged_pair(2)
    pat = patching.patch_heads(llama_model, data, corrupted)
    assert torch.equal(head_scores(pat, 2, 4), pat.effects.double().abs())
    atp = chg_lens.attribute_heads(llama_model, data, corrupted)
    assert torch.equal(head_scores(atp, 2, 4), atp.effects.double().abs())
    chg = chg_lens.fit_chg(llama_model, data, n_seeds=2, updates=2, reg_updates=2, batch_size=4, progress=False)
    fac = chg.scores().groupby(["layer", "head"]).facilitation.mean().to_numpy().reshape(2, 4)
    assert torch.allclose(head_scores(chg, 2, 4), torch.tensor(fac, dtype=torch.float64))
    anyf = chg.aggregate().any_facilitation.to_numpy().reshape(2, 4)
    assert torch.allclose(head_scores((chg, "any_facilitation"), 2, 4), torch.tensor(anyf, dtype=torch.float64))
    gp = chg.g_plus.double().mean(0)
    assert torch.allclose(head_scores((chg, "g_plus"), 2, 4), gp)
    with pytest.raises(ValueError, match="unknown CHG column 'best'"):
        head_scores((chg, "best"), 2, 4)
    part = patching.patch_heads(llama_model, data, corrupted, heads=[(0, 0)])
    with pytest.raises(ValueError, match="no effect for 7 of 8 heads"):
        head_scores(part, 2, 4)


def test_bad_rankings_fail_before_any_pass(llama_model, monkeypatch):
    data, corrupted = ragged_pair(3)

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran before the input was checked")

    monkeypatch.setattr(faith_mod, "score_configs", no_pass)
    monkeypatch.setattr(faith_mod, "collect_z", no_pass)
    ok = torch.zeros(2, 4)
    cases = [
        ({"a": torch.zeros(2, 5)}, {}, ValueError, r"\[2, 5\] heads but the model has \[2, 4\]"),
        ({"a": torch.zeros(8)}, {}, ValueError, "heads but the model has"),
        ({"a": torch.tensor([[0.0, float("nan"), 0, 0], [0, 0, 0, 0]])}, {}, ValueError, "NaN"),
        ({"a": torch.full((2, 4), float("inf"))}, {}, ValueError, "infinite"),
        ({"a": "facilitation"}, {}, ValueError, "unknown ranking 'facilitation'"),
        ({"a": [[0.0] * 4] * 2}, {}, TypeError, "cannot rank heads by a list"),
        ({"a": (ok, "any_facilitation")}, {}, TypeError, r"\(CHGResult, column name\)"),
        ({"a": torch.zeros(2, 4, dtype=torch.bool)}, {}, TypeError, "real numbers"),
        ({}, {}, ValueError, "non-empty mapping"),
        ({"a": ok}, dict(ablation="resample"), ValueError, "ablation must be one of"),
        ({"a": ok}, dict(ablation=corrupted.subset([0])), ValueError, "rows"),
        ({"a": ok}, dict(metric="kl"), ValueError, "metric must be one of"),
        ({"a": ok}, dict(metric="logit_diff", ablation="zero"), None, None),
        ({"a": ok}, dict(n_heads=[9]), ValueError, "exceed the model's 8 heads"),
        ({"a": ok}, dict(n_heads=[1.5]), ValueError, "whole number"),
        ({"a": ok}, dict(n_heads=3), ValueError, "list of circuit sizes"),
        ({"a": ok}, dict(n_random=0), ValueError, "n_random"),
        ({"a": ok}, dict(ablation="zero", reference=data), ValueError, "reference"),
        ({"a": ok}, dict(autocast="fp64"), ValueError, "autocast"),
    ]
    for rankings, kwargs, err, match in cases:
        if err is None:  # data has answers: logit_diff is accepted (and then the pass would run)
            with pytest.raises(AssertionError, match="a pass ran"):
                faithfulness(llama_model, data, rankings, **kwargs)
            continue
        with pytest.raises(err, match=match):
            faithfulness(llama_model, data, rankings, **kwargs)
    no_answers = chg_lens.TaskDataset(data.tokens, data.loss_mask, data.lengths, PAD, "x")
    with pytest.raises(ValueError, match="answers"):
        faithfulness(llama_model, no_answers, {"a": ok}, metric="logit_diff")
    with pytest.raises(ValueError, match="random orders"):
        head_scores(None, 2, 4)


# ----------------------------------------------------------------------------- a known circuit
def test_every_method_puts_a_known_circuit_first(tmp_path):
    from chg_lens import ablation
    from conftest import KNOWN_WORDS, known_answer_data

    model = models.load_model(circuit_hf(), tokenizer=word_tokenizer(KNOWN_WORDS))
    data = known_answer_data(64)
    clean, corrupted = known_pairs(32)
    pat = patching.patch_heads(model, clean, corrupted)
    atp = chg_lens.attribute_heads(model, clean, corrupted)
    sweep = ablation.head_sweep(model, data, method="mean")
    chg = chg_lens.fit_chg(model, data, n_seeds=2, updates=30, reg_updates=30, batch_size=16, progress=False)
    rankings = {"chg": chg, "chg_any": (chg, "any_facilitation"), "patching": pat, "attribution": atp,
                "ablation": -sweep.tensor("delta_logprob"), "random": None}
    for name, r in rankings.items():
        if r is not None:
            top = head_order(head_scores(r, 2, 4))[:2].tolist()
            assert {divmod(i, 4) for i in top} == CIRCUIT, name
    res = chg_lens.faithfulness(model, data, rankings, ablation="mean", n_random=4)  # the module, called
    f = res.frame.set_index(["method", "k"])["normalized"]
    for name in ("chg", "chg_any", "patching", "attribution", "ablation"):
        assert f[(name, 1)] < 0.2, name        # one half of a serial circuit does nothing (measured 0.07)
        assert f[(name, 2)] > 0.9, name        # both halves: the behaviour (measured 1.10; the noise hurts)
    assert f[("random", 2)] < 0.5              # measured 0.23
    cpr = res.cpr()
    assert (cpr.drop("random") > cpr["random"] + 0.25).all()  # measured 0.85-0.89 vs 0.50
    assert (res.cmd().drop("random") < res.cmd()["random"]).all()
    # the linear estimate of a serial head's patch falls short of the patch (measured 3.7 vs 5.7)
    assert atp.effects[0, 0] < 0.8 * pat.effects[0, 0]
