"""Figures build from small hand-made results and their traces carry the right numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from chg_lens import plot, taxonomy
from chg_lens.chg import CHGResult

S, L, H = 2, 3, 4


def make_result(seed: int = 0, model: str = "m", task: str = "t", n_snaps: int = 3) -> CHGResult:
    g = torch.Generator().manual_seed(seed)
    logits = {k: torch.randn(S, L, H, generator=g) * 2 for k in ("g0", "g_plus", "g_minus")}
    snaps = {k: torch.rand(n_snaps, S, L, H, generator=g) for k in logits}
    steps = {k: torch.arange(n_snaps) * 5 for k in logits}
    traces = {k: {"nll": torch.rand(10, S, generator=g)} for k in logits}
    return CHGResult(logits=logits, traces=traces, snapshots=snaps, snapshot_steps=steps,
                     config={"updates": 10, "reg_updates": 10, "batch_size": 4, "lam": 0.1},
                     meta={"model": model, "task": task, "n_layers": L, "n_heads": H})


@pytest.fixture(scope="module")
def result():
    return make_result()


def test_heatmap_z_equals_mean_scores(result):
    for value in ("g0", "g_plus", "g_minus", "facilitation", "interference", "irrelevance"):
        fig = plot.heatmap(result, value)
        z = np.array(fig.data[0].z, dtype=float)
        want = (result.g0 if value == "g0" else
                {"g_plus": result.g_plus, "g_minus": result.g_minus}.get(value,
                 taxonomy.score_tensors(result.g_plus, result.g_minus).get(value))).double().mean(0).numpy()
        np.testing.assert_allclose(z, want, rtol=1e-6)
    one = plot.heatmap(result, "g_plus", seed=1)
    np.testing.assert_allclose(np.array(one.data[0].z, float), result.g_plus[1].double().numpy(), rtol=1e-6)
    hover = one.data[0].hovertext[2][3]
    assert "layer 2, head 3" in hover and "facilitation" in hover and "role:" in hover


def test_role_map_rgb_is_always_and_any(result):
    fig = plot.role_map(result)
    scores = taxonomy.score_tensors(result.g_plus, result.g_minus)
    always, any_ = (np.array(fig.data[k].z) for k in range(2))
    assert always.shape == (L, H, 3)
    np.testing.assert_array_equal(always[..., 0], np.round(255 * scores["interference"].min(0).values.double().numpy()))
    np.testing.assert_array_equal(any_[..., 1], np.round(255 * scores["facilitation"].max(0).values.double().numpy()))
    assert (always[..., 2] == 0).all()
    with pytest.raises(ValueError, match="mode"):
        plot.role_map(result, mode="sometimes")


def test_gate_scatter_points_and_regions(result):
    fig = plot.gate_scatter(result)
    pts = fig.data[1]
    np.testing.assert_allclose(pts.x, result.g_plus.flatten().double().numpy())
    np.testing.assert_allclose(pts.y, result.g_minus.flatten().double().numpy())
    np.testing.assert_array_equal(pts.marker.color, np.tile(np.repeat(np.arange(L), H), S))
    region = np.array(fig.data[0].z)
    # bottom-left (G+ = G- = 0) is interfering, top (G- = 1) facilitating, bottom-right irrelevant
    assert region[0, 0] == 1 and region[-1, 50] == 0 and region[0, -1] == 2
    mean = plot.gate_scatter(result, seed="mean")
    np.testing.assert_allclose(mean.data[1].x, result.g_plus.double().mean(0).flatten().numpy())


def test_trajectories_by_stage(result):
    fig = plot.trajectories(result, heads=[(1, 2)], seed=1)
    assert [t.line.dash for t in fig.data] == ["solid", "dash", "dot"]
    np.testing.assert_allclose(fig.data[1].y, result.snapshots["g_plus"][:, 1, 1, 2].double().numpy())
    np.testing.assert_array_equal(fig.data[1].x, np.arange(3) * 5 + 10)  # after G0's 10 updates
    assert len(plot.trajectories(result).data) >= 3  # default heads: the top head per score
    with pytest.raises(ValueError, match="seed"):
        plot.trajectories(result, seed=7)


def test_ablation_curves_mean_over_seeds():
    rows = [dict(score=s, seed=seed, step=k, layer=0, head=k, logprob_retained=-1.0,
                 logprob_ablated=-1.0 + d, delta_logprob=d)
            for s, sign in (("facilitation", -1), ("irrelevance", 0), ("interference", 1))
            for seed in range(3) for k in range(1, 5) for d in [sign * k * (1 + 0.1 * seed)]]
    fig = plot.ablation_curves(pd.DataFrame(rows))
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    np.testing.assert_allclose(lines["facilitation"].y, [-1.1 * k for k in range(1, 5)])
    np.testing.assert_allclose(lines["interference"].y, [1.1 * k for k in range(1, 5)])
    with pytest.raises(ValueError, match="delta_logprob"):
        plot.ablation_curves(pd.DataFrame({"score": ["x"], "seed": [0], "step": [1]}))


def test_score_cdf_and_consistency():
    a, b, c = make_result(0, "a"), make_result(1, "b"), make_result(2, "c")
    frames = [r.scores() for r in (a, b, c)]
    fig = plot.score_cdf([a, b, c])
    first = fig.data[0]  # model a, facilitation
    np.testing.assert_allclose(first.x, np.sort(frames[0].facilitation))
    np.testing.assert_allclose(first.y, np.arange(1, S * L * H + 1) / (S * L * H))
    cons = taxonomy.cross_model_consistency(pd.concat(frames))
    assert len(cons) == 3 * 3 and "pearson r" in fig.layout.title.text.lower()


def test_cross_model_consistency_numbers():
    rng = np.random.default_rng(0)
    v = rng.uniform(size=200)
    frame = pd.DataFrame({"model": ["a"] * 200 + ["b"] * 200 + ["c"] * 200, "task": "t",
                          "facilitation": np.concatenate([v, v, 1 - v ** 4]),
                          "interference": np.concatenate([v, v[::-1], v ** 3]),
                          "irrelevance": np.concatenate([v, v, v])})
    c = taxonomy.cross_model_consistency(frame, n_grid=11).set_index(["score", "model_a", "model_b"]).pearson
    assert c["facilitation", "a", "b"] == pytest.approx(1.0)
    assert c["interference", "a", "b"] == pytest.approx(1.0)  # same distribution, heads reordered
    grid = np.linspace(0, 1, 11)
    cdf = lambda x: (x[None, :] <= grid[:, None]).mean(1)
    want = np.corrcoef(cdf(v), cdf(1 - v ** 4))[0, 1]
    assert c["facilitation", "a", "c"] == pytest.approx(want) and want < 0.99
    with pytest.raises(ValueError, match="model"):
        taxonomy.cross_model_consistency(frame.drop(columns="model"))


def test_layer_importance_and_histograms(result):
    fig = plot.layer_importance(result)
    sc = taxonomy.score_tensors(result.g_plus, result.g_minus)
    for bar in fig.data:
        np.testing.assert_allclose(bar.y, sc[bar.name].double().mean(dim=(0, 2)).numpy())
    hist = plot.gate_histograms(result)
    np.testing.assert_allclose(hist.data[0].x, result.g0.flatten().double().numpy())
    assert len(hist.data) == 3


def test_chg_vs_cma_and_contrastive():
    frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "facilitation": [0.9, 0.2, 0.8, 0.1],
                          "effect": [3.0, 0.1, 2.0, -0.2], "mediating": [True, False, True, False]})
    fig = plot.chg_vs_cma(frame)
    med = next(t for t in fig.data if t.name == "mediating heads")
    np.testing.assert_allclose(med.x, [3.0, 2.0]) and np.testing.assert_allclose(med.y, [0.9, 0.8])
    assert "mediating 0.850" in fig.layout.title.text and "layer 1, head 0" in med.hovertext[1]
    rows = [dict(direction=d, heldout_task=t, format=f, gates=g, accuracy=acc, ci_low=acc - 0.1,
                 ci_high=min(1, acc + 0.05), n=50)
            for d in ("retain_icl", "retain_instruction") for t in ("capitalize", "present-past")
            for f in ("icl", "instruction") for g, acc in (("default", 0.9), ("gated", 0.3))]
    bars = plot.contrastive_bars(pd.DataFrame(rows))
    assert len(bars.data) == 2 * 2 * 2
    np.testing.assert_allclose(bars.data[0].y, [0.9, 0.3])
    np.testing.assert_allclose(bars.data[0].error_y.arrayminus, [0.1, 0.1])
    with pytest.raises(ValueError, match="ci_low"):
        plot.contrastive_bars(pd.DataFrame(rows).drop(columns="ci_low"))


def test_export_html_and_image_message(tmp_path, result):
    fig = plot.heatmap(result)
    path = plot.save_html(fig, tmp_path / "f.html")
    text = path.read_text()
    assert "plotly" in text and len(text) > 1_000_000  # plotly.js embedded
    small = plot.save_html(fig, tmp_path / "c.html", include_plotlyjs="cdn").read_text()
    assert "cdn.plot.ly" in small and len(small) < 100_000
    ok, why = plot.image_export_available()
    if not ok:
        with pytest.raises(RuntimeError, match="kaleido|Chrom"):
            plot.save_image(fig, tmp_path / "f.png")


def test_an_interrupted_html_write_keeps_the_old_file_whole(tmp_path, result, monkeypatch):
    import chg_lens.results as results

    fig = plot.heatmap(result)
    path = plot.save_html(fig, tmp_path / "f.html", include_plotlyjs="cdn")
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        plot.save_html(plot.convergence(result), path, include_plotlyjs="cdn")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.html"]  # no temporary file left behind


def test_convergence_figure_shows_nll_and_movement(result):
    fig = plot.convergence(result)
    names = [t.name for t in fig.data]
    assert names == ["g0 nll", "g0 moving", "g_plus nll", "g_plus moving", "g_minus nll", "g_minus moving"]
    np.testing.assert_allclose(fig.data[2].y, result.traces["g_plus"]["nll"].double().mean(1).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(fig.data[2].x, np.arange(10) + 11)  # after G0's 10 updates
    snaps = result.snapshots["g0"]
    want = [((snaps[i] - snaps[i - 1]).abs() > 0.05).double().flatten(1).mean(1).mean().item() for i in (1, 2)]
    np.testing.assert_allclose(fig.data[1].y, want, rtol=1e-6)
    np.testing.assert_array_equal(fig.data[1].x, [5, 10])
    windows = [(s.x0, s.x1) for s in fig.layout.shapes]
    assert windows == [(0, 10)] * 2 + [(10, 20)] * 4  # each stage's window, on both rows
    assert "NOT converged" in fig.layout.title.text
