"""Figures for CHG results (plotly). Every function returns a ``plotly.graph_objects.Figure``; nothing
is shown or written unless you call :func:`save_html` / :func:`save_image` (or ``fig.show()``).

Plot functions take pandas DataFrames with documented columns, so they work on results of any origin
(a saved CSV, another library); each also accepts the matching result object (``CHGResult``;
``ablation.AblationResult``, ``patching.Comparison``, or any object whose ``frame`` attribute or
``frame()`` / ``to_frame()`` method gives those columns).

Example::

    from chg_lens import plot
    result = chg_lens.fit_chg(model, train, n_seeds=4)
    plot.gate_scatter(result)                     # G+ against G-, coloured by layer (paper Fig. 1c)
    plot.role_map(result, mode="always")          # red = interference, green = facilitation (Fig. 3b)
    plot.save_html(plot.score_cdf(result), "cdf.html")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from . import taxonomy

try:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
except ImportError as err:  # pragma: no cover - plotly is in the `plot` extra
    raise ImportError("chg_lens.plot needs plotly: plotly is a dependency of chg_lens: pip install plotly") from err

SCORES = taxonomy.SCORES
SCORE_COLORS = {"facilitation": "#2ca02c", "interference": "#d62728", "irrelevance": "#1f77b4"}
ROLE_COLORS = {"facilitating": "#2ca02c", "interfering": "#d62728", "irrelevant": "#1f77b4"}
STAGE_DASH = {"g0": "solid", "g_plus": "dash", "g_minus": "dot"}
STAGE_LABEL = {"g0": "G0 (λ = 0)", "g_plus": "G+ (toward 1)", "g_minus": "G- (toward 0)"}
GATE_COLUMNS = ("g0", "g_plus", "g_minus")

ABLATION_COLUMNS = ("score", "seed", "step", "layer", "head", "logprob_retained", "logprob_ablated", "delta_logprob")
CMA_COLUMNS = ("layer", "head", "facilitation", "effect", "mediating")
CONTRASTIVE_COLUMNS = ("direction", "heldout_task", "format", "gates", "accuracy", "ci_low", "ci_high", "n")
FAITHFULNESS_COLUMNS = ("method", "k", "fraction", "normalized")
METHOD_COLORS = {"chg": "#2ca02c", "attribution": "#ff7f0e", "patching": "#d62728", "ablation": "#1f77b4",
                 "random": "#7f7f7f"}


# ----------------------------------------------------------------------------- inputs
def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{what} expects a pandas DataFrame (or a result object); got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing} (have {list(frame.columns)})")
    if frame.empty:
        raise ValueError(f"{what} got an empty frame")
    return frame


def _as_frame(x: Any, method: str | None = None) -> pd.DataFrame:
    """A DataFrame from ``x``: itself, ``x.<method>()``, ``x.frame()`` or ``x.to_frame()``."""
    if isinstance(x, pd.DataFrame):
        return x
    for name in (method, "frame", "to_frame"):
        attr = getattr(x, name, None) if name else None
        out = attr() if callable(attr) else attr
        if isinstance(out, pd.DataFrame):
            return out
    raise TypeError(f"expected a DataFrame or a result object with .{method or 'frame'}; got {type(x).__name__}")


def gate_frame(result: Any) -> pd.DataFrame:
    """The per-(seed, layer, head) frame of a ``CHGResult`` with ``g0`` added next to ``g_plus``/``g_minus``.

    A DataFrame is returned unchanged. Example: ``plot.gate_frame(result).head()``.
    """
    if isinstance(result, pd.DataFrame):
        return result
    frame = _as_frame(result, "scores")
    g0 = getattr(result, "g0", None)
    if g0 is not None and "g0" not in frame.columns:
        frame = frame.copy()
        frame["g0"] = g0.flatten().double().numpy()  # scores() rows are (seed, layer, head) in C order
    return frame


def _hover(frame: pd.DataFrame) -> list[str]:
    """Hover text per row: layer, head, seed (if any), gates, every score and the role."""
    cols = [c for c in ("model", "task", "seed") if c in frame.columns]
    vals = [c for c in GATE_COLUMNS + SCORES if c in frame.columns]
    vals += [c for c in frame.columns if c.startswith(("always_", "any_", "mean_"))]
    out = []
    for rec in frame.to_dict("records"):
        parts = [f"layer {int(rec['layer'])}, head {int(rec['head'])}"]
        parts += [f"{c}: {rec[c]}" for c in cols]
        parts += [f"{c}: {float(rec[c]):.3f}" for c in vals if pd.notna(rec[c])]
        if "role" in rec:
            parts.append(f"role: {rec['role']}")
        out.append("<br>".join(parts))
    return out


def head_table(scores: Any) -> pd.DataFrame:
    """Per head (and model/task when present): mean over seeds of the gates and scores, the
    always/any aggregates and the role of the mean scores. Used for hover text and head rankings.

    Example: ``plot.head_table(result).sort_values("mean_facilitation", ascending=False)``.
    """
    frame = gate_frame(scores)
    _require(frame, ("layer", "head") + SCORES, "head_table")
    by = [c for c in ("model", "task") if c in frame.columns] + ["layer", "head"]
    value_cols = [c for c in GATE_COLUMNS + SCORES if c in frame.columns]
    mean = frame.groupby(by, sort=True)[value_cols].mean().add_prefix("mean_")
    agg = taxonomy.aggregate(frame, by=tuple(by)).set_index(by)
    out = pd.concat([mean, agg], axis=1).reset_index()
    out["role"] = taxonomy.frame_roles(out, prefix="mean_")
    return out


# ----------------------------------------------------------------------------- Figure 1
def trajectories(
    traj: Any, heads: Sequence[tuple[int, int]] | None = None, seed: int = 0, scores: pd.DataFrame | None = None
) -> go.Figure:
    """Gate value against update for chosen heads, line style by stage (paper Fig. 1b).

    ``traj`` has columns ``stage, update, seed, layer, head, gate`` (``CHGResult.trajectories()``);
    a ``CHGResult`` also works and then ``heads`` defaults to its most facilitating, most
    interfering and most irrelevant head (mean over seeds). Colours are per head; G0 is solid,
    G+ dashed, G- dotted (G+/G- continue the update count after G0).

    Example: ``plot.trajectories(result, heads=[(3, 1), (5, 0)])``.
    """
    frame = _require(_as_frame(traj, "trajectories"), ("stage", "update", "seed", "layer", "head", "gate"),
                     "trajectories")
    if heads is None:
        if scores is None and not isinstance(traj, pd.DataFrame) and hasattr(traj, "scores"):
            scores = traj.scores()
        if scores is not None:
            table = head_table(scores)
            heads = []
            for s in SCORES:
                best = table.sort_values(f"mean_{s}", ascending=False).iloc[0]
                if (int(best["layer"]), int(best["head"])) not in heads:
                    heads.append((int(best["layer"]), int(best["head"])))
        else:
            heads = [tuple(x) for x in frame[["layer", "head"]].drop_duplicates().head(3).to_numpy()]
    if seed not in set(frame["seed"]):
        raise ValueError(f"seed {seed} is not in the trajectories (seeds: {sorted(set(frame['seed']))})")
    fig = go.Figure()
    palette = ["#2ca02c", "#d62728", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (layer, head) in enumerate(heads):
        sel = frame[(frame["layer"] == layer) & (frame["head"] == head) & (frame.seed == seed)]
        if sel.empty:
            raise ValueError(f"no trajectory for layer {layer} head {head}")
        for stage in [s for s in STAGE_DASH if s in set(sel.stage)]:
            part = sel[sel.stage == stage].sort_values("update")
            fig.add_trace(go.Scatter(
                x=part["update"], y=part["gate"], mode="lines",
                line=dict(color=palette[i % len(palette)], dash=STAGE_DASH[stage]),
                name=f"L{layer}H{head} {STAGE_LABEL[stage]}", legendgroup=f"L{layer}H{head}",
                hovertemplate=f"layer {layer}, head {head}<br>{stage}<br>update %{{x}}<br>gate %{{y:.3f}}<extra></extra>",
            ))
    fig.update_layout(title=f"Gate trajectories (seed {seed})", xaxis_title="update", yaxis_title="gate",
                      yaxis_range=[-0.02, 1.02], template="plotly_white")
    return fig


def convergence(result: Any, move: float = 0.05) -> go.Figure:
    """How a fit settled: the NLL per update (mean over seeds, top) and the gate movement between
    consecutive snapshots (bottom: share of gates that moved more than ``move``, mean over seeds),
    per stage; G+/G- continue the update count after G0. The shaded spans are each stage's
    diagnostic window (``result.diagnostics()``).

    ``result`` is a ``CHGResult`` or ``ContrastiveResult`` (anything with ``trace_frame()``,
    ``trajectories()`` and ``diagnostics()``). Example: ``plot.convergence(result)``.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("NLL per update (mean over seeds)", f"share of gates moving > {move:g} between snapshots"))
    traces = result.trace_frame()
    traj = result.trajectories()
    diag = result.diagnostics()
    offsets = {st: int(u) - int(traces.loc[traces.stage == st, "update"].max()) - 1
               for st, u in traj.groupby("stage")["update"].max().items()}  # trajectories' update numbering
    colors = {"g0": "#444444", "g_plus": "#d62728", "g_minus": "#2ca02c"}
    name = "nll" if "nll" in set(traces.name) else "loss"
    for stage in dict.fromkeys(traces.stage):
        part = traces[(traces.stage == stage) & (traces.name == name)].groupby("update").value.mean()
        off = offsets.get(stage, 0)
        color = colors.get(stage, "#1f77b4")
        fig.add_trace(go.Scatter(x=part.index + off + 1, y=part.values, mode="lines", name=f"{stage} {name}",
                                 line=dict(color=color), legendgroup=stage), row=1, col=1)
        snaps = traj[traj.stage == stage].pivot_table(index=["seed", "layer", "head"], columns="update", values="gate")
        steps = list(snaps.columns)
        if len(steps) > 1:
            moved = (snaps.diff(axis=1).abs() > move).groupby(level="seed").mean().mean(axis=0)
            fig.add_trace(go.Scatter(x=steps[1:], y=moved.values[1:], mode="lines+markers", name=f"{stage} moving",
                                     line=dict(color=color, dash="dot"), legendgroup=stage), row=2, col=1)
        d = diag[diag.stage == stage]
        if len(d):
            end = int(d.updates.max()) + off  # in snapshot coordinates: "after this many updates"
            fig.add_vrect(x0=end - int(d.window.max()), x1=end, fillcolor=color, opacity=0.08, line_width=0)
    fig.update_layout(title="Convergence" + (" (converged)" if diag.attrs.get("converged") else " (NOT converged)"),
                      template="plotly_white", height=520)
    fig.update_xaxes(title_text="update", row=2, col=1)
    fig.update_yaxes(rangemode="tozero", row=2, col=1)
    return fig


def gate_scatter(scores: Any, seed: int | str | None = None, grid: int = 101) -> go.Figure:
    """G+ (x) against G- (y) per head, coloured by layer, on a background of role regions (Fig. 1c).

    ``scores`` has columns ``layer, head, g_plus, g_minus`` (+ scores/role for hover), e.g.
    ``CHGResult.scores()``. ``seed=None`` plots every (seed, head) point; an int keeps one seed;
    ``"mean"`` averages the gates over seeds. The background shades where each role wins
    (:func:`chg_lens.taxonomy.roles` on a ``grid`` x ``grid`` lattice).

    Example: ``plot.gate_scatter(result, seed="mean")``.
    """
    frame = _require(gate_frame(scores), ("layer", "head", "g_plus", "g_minus"), "gate_scatter")
    if seed == "mean":
        frame = head_table(frame).rename(columns={f"mean_{c}": c for c in GATE_COLUMNS + SCORES})
    elif seed is not None:
        frame = frame[frame.seed == seed]
        if frame.empty:
            raise ValueError(f"seed {seed} is not in the scores")
    import torch

    axis = torch.linspace(0, 1, grid)
    gp, gm = torch.meshgrid(axis, axis, indexing="xy")  # gp varies along x (columns), gm along y (rows)
    region = taxonomy.roles(taxonomy.score_tensors(gp, gm)).numpy()
    colors = [ROLE_COLORS[taxonomy.ROLES[s]] for s in SCORES]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        x=axis.numpy(), y=axis.numpy(), z=region, zmin=0, zmax=2, showscale=False, opacity=0.15,
        colorscale=[[0, colors[0]], [0.33, colors[0]], [0.34, colors[1]], [0.66, colors[1]], [0.67, colors[2]],
                    [1, colors[2]]], hoverinfo="skip", name="role regions",
    ))
    for role, (x, y) in {"facilitating": (0.5, 0.85), "interfering": (0.15, 0.15), "irrelevant": (0.85, 0.15)}.items():
        fig.add_annotation(x=x, y=y, text=role, showarrow=False, font=dict(color=ROLE_COLORS[role], size=13))
    fig.add_trace(go.Scatter(
        x=frame["g_plus"], y=frame["g_minus"], mode="markers", name="heads",
        marker=dict(color=frame["layer"], colorscale="Viridis", showscale=True, colorbar=dict(title="layer"),
                    size=8, line=dict(width=0.5, color="white")),
        hovertext=_hover(frame), hoverinfo="text",
    ))
    fig.update_layout(title="G+ against G- per head", xaxis_title="G+ (fitted toward 1)",
                      yaxis_title="G- (fitted toward 0)", xaxis_range=[0, 1], yaxis_range=[0, 1],
                      template="plotly_white", width=620, height=560)
    return fig


# ----------------------------------------------------------------------------- Figure 2
def ablation_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard error and count of ``delta_logprob`` over seeds per (score, step)."""
    _require(frame, ("score", "seed", "step", "delta_logprob"), "ablation_summary")
    g = frame.groupby(["score", "step"], sort=True)["delta_logprob"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["sem"] = (out["std"].fillna(0) / np.sqrt(out["count"])).to_numpy()
    return out


def ablation_curves(ablation: Any, band: bool = True) -> go.Figure:
    """Change in target log-probability against number of heads ablated, one line per score (Fig. 2).

    ``ablation`` has columns ``score, seed, step, layer, head, logprob_retained, logprob_ablated,
    delta_logprob`` (one row per seed, score and step; ``step`` = heads ablated so far, ``layer``/
    ``head`` the head ablated at that step). Lines are the mean over seeds; the band is +- one
    standard error. Positive = the task got better.

    Example: ``plot.ablation_curves(chg_lens.ablation.figure2(model, val, chg_result))``.
    """
    frame = _require(_as_frame(ablation), ("score", "seed", "step", "delta_logprob"), "ablation_curves")
    summary = ablation_summary(frame)
    fig = go.Figure()
    for score in [s for s in SCORES if s in set(summary.score)] + sorted(set(summary.score) - set(SCORES)):
        part = summary[summary.score == score]
        color = SCORE_COLORS.get(score, "#7f7f7f")
        if band and (part["count"] > 1).any():
            fig.add_trace(go.Scatter(
                x=np.concatenate([part["step"], part["step"][::-1]]),
                y=np.concatenate([part["mean"] + part["sem"], (part["mean"] - part["sem"])[::-1]]),
                fill="toself", fillcolor=color, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                showlegend=False, name=f"{score} ± s.e.",
            ))
        fig.add_trace(go.Scatter(
            x=part["step"], y=part["mean"], mode="lines+markers", name=score, line=dict(color=color),
            hovertemplate=f"{score}<br>heads ablated %{{x}}<br>Δ log p %{{y:.3f}}<extra></extra>",
        ))
    fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"))
    fig.update_layout(title="Ablating heads in descending score order (from G+)", xaxis_title="heads ablated",
                      yaxis_title="Δ target log-probability (ablated − retained)", template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- Figure 3
def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / len(x)


def score_cdf(scores: Any | Sequence[Any], consistency: bool = True) -> go.Figure:
    """Empirical CDF of each score across heads (and seeds), one panel per (model, task) (Fig. 3a).

    ``scores`` has columns ``model, task`` and the three scores (``CHGResult.scores()``, or several
    concatenated; a list of results/frames is concatenated for you). With ``consistency`` and more
    than one model, the title reports the cross-model Pearson correlation of
    :func:`chg_lens.taxonomy.cross_model_consistency` (min and mean over model pairs).

    Example: ``plot.score_cdf([result_a, result_b])``.
    """
    frame = _concat_scores(scores)
    _require(frame, ("model", "task") + SCORES, "score_cdf")
    models_, tasks_ = list(dict.fromkeys(frame.model)), list(dict.fromkeys(frame.task))
    fig = make_subplots(rows=len(models_), cols=len(tasks_), shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[f"{m} / {t}" for m in models_ for t in tasks_],
                        vertical_spacing=0.08 if len(models_) > 1 else 0.1)
    for i, m in enumerate(models_):
        for j, t in enumerate(tasks_):
            part = frame[(frame.model == m) & (frame.task == t)]
            if part.empty:
                continue
            for s in SCORES:
                x, y = _ecdf(part[s].to_numpy())
                fig.add_trace(go.Scatter(
                    x=x, y=y, mode="lines", line=dict(color=SCORE_COLORS[s], shape="hv"), name=s,
                    legendgroup=s, showlegend=(i == 0 and j == 0),
                    hovertemplate=f"{m} / {t}<br>{s} <= %{{x:.3f}}: %{{y:.1%}} of heads<extra></extra>",
                ), row=i + 1, col=j + 1)
    title = "Empirical CDF of CHG scores across heads"
    if consistency and len(models_) > 1:
        c = taxonomy.cross_model_consistency(frame)
        if len(c):
            title += f" — cross-model Pearson r: min {c.pearson.min():.3f}, mean {c.pearson.mean():.3f} ({len(c)} pairs)"
    fig.update_layout(title=title, template="plotly_white", height=260 * len(models_) + 120,
                      legend=dict(orientation="h", y=-0.08))
    fig.update_xaxes(title_text="score", range=[0, 1], row=len(models_))
    fig.update_yaxes(title_text="fraction of heads <= score", col=1)
    return fig


def _concat_scores(scores: Any | Sequence[Any]) -> pd.DataFrame:
    if isinstance(scores, (list, tuple)):
        return pd.concat([_as_frame(s, "scores") for s in scores], ignore_index=True)
    return _as_frame(scores, "scores")


def _grid(frame: pd.DataFrame, value: str) -> np.ndarray:
    L, H = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    z = np.full((L, H), np.nan)
    z[frame["layer"].to_numpy().astype(int), frame["head"].to_numpy().astype(int)] = frame[value].to_numpy()
    return z


def role_map(scores: Any, mode: str | Sequence[str] = ("always", "any")) -> go.Figure:
    """Layer x head RGB map: red = interference, green = facilitation, blue = 0 (Fig. 3b).

    Black = irrelevant (low in both), yellow = high in both. ``mode`` "always" takes each score's
    minimum over seeds, "any" the maximum; a list draws one panel per mode. Rows are layers
    (layer 0 at the top), columns heads. Pixel values are ``round(255 * score)``.

    Example: ``plot.role_map(result, mode="always")``.
    """
    frame = gate_frame(scores)
    _require(frame, ("layer", "head") + SCORES, "role_map")
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in ("always", "any"):
            raise ValueError(f"mode must be 'always' or 'any' (or a list of them); got {m!r}")
    table = head_table(frame)
    if "model" in table and table.model.nunique() > 1 or "task" in table and table.task.nunique() > 1:
        raise ValueError("role_map draws one model/task; filter the frame first (e.g. scores[scores.task == 'ioi'])")
    hover = np.empty((int(table["layer"].max()) + 1, int(table["head"].max()) + 1), dtype=object)
    hover[table["layer"].astype(int), table["head"].astype(int)] = _hover(table)
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=[m.capitalize() for m in modes])
    for k, m in enumerate(modes):
        red, green = _grid(table, f"{m}_interference"), _grid(table, f"{m}_facilitation")
        rgb = np.stack([red, green, np.zeros_like(red)], axis=-1)
        rgb = np.nan_to_num(np.round(255 * np.clip(rgb, 0, 1))).astype(np.uint8)
        fig.add_trace(go.Image(z=rgb, hovertext=hover, hoverinfo="text", name=m), row=1, col=k + 1)
        fig.update_xaxes(title_text="head", row=1, col=k + 1)
    fig.update_yaxes(title_text="layer", col=1)
    fig.update_layout(title="Interference (red) and facilitation (green) per head", template="plotly_white")
    return fig


def heatmap(scores: Any, value: str = "facilitation", seed: int | None = None,
            colorscale: str = "Viridis") -> go.Figure:
    """Plain layer x head heat map of a gate (``g0``, ``g_plus``, ``g_minus``) or a score, the mean
    over seeds (or one ``seed``). ``z[layer][head]`` is that value.

    Example: ``plot.heatmap(result, "g_plus")``.
    """
    frame = gate_frame(scores)
    _require(frame, ("layer", "head", value), f"heatmap({value!r})")
    if seed is not None:
        frame = frame[frame.seed == seed]
        if frame.empty:
            raise ValueError(f"seed {seed} is not in the scores")
    table = head_table(frame) if all(s in frame for s in SCORES) else (
        frame.groupby(["layer", "head"])[[value]].mean().add_prefix("mean_").reset_index())
    z = _grid(table, f"mean_{value}")
    hover = np.empty(z.shape, dtype=object)
    hover[table["layer"].astype(int), table["head"].astype(int)] = _hover(table)
    fig = go.Figure(go.Heatmap(z=z, x=list(range(z.shape[1])), y=list(range(z.shape[0])), colorscale=colorscale,
                               zmin=0, zmax=1, colorbar=dict(title=value), hovertext=hover, hoverinfo="text"))
    what = "mean over seeds" if seed is None else f"seed {seed}"
    fig.update_layout(title=f"{value} per head ({what})", xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", template="plotly_white")
    return fig


def layer_importance(scores: Any) -> go.Figure:
    """Mean of each score over the heads (and seeds) of every layer, grouped bars.

    Example: ``plot.layer_importance(result)``.
    """
    frame = _require(gate_frame(scores), ("layer",) + SCORES, "layer_importance")
    by_layer = frame.groupby("layer", sort=True)[list(SCORES)].mean()
    fig = go.Figure([go.Bar(x=by_layer.index, y=by_layer[s], name=s, marker_color=SCORE_COLORS[s],
                            hovertemplate=f"layer %{{x}}<br>mean {s} %{{y:.3f}}<extra></extra>") for s in SCORES])
    fig.update_layout(barmode="group", title="Mean score per layer", xaxis_title="layer",
                      yaxis_title="mean score over heads and seeds", template="plotly_white")
    return fig


def gate_histograms(scores: Any, nbins: int = 20) -> go.Figure:
    """Histograms of the fitted gate values G0, G+ and G- over all (seed, head) pairs.

    Example: ``plot.gate_histograms(result)``.
    """
    frame = gate_frame(scores)
    cols = [c for c in GATE_COLUMNS if c in frame.columns]
    _require(frame, cols or ["g_plus"], "gate_histograms")
    fig = go.Figure([go.Histogram(x=frame[c], name=STAGE_LABEL[c], opacity=0.6,
                                  xbins=dict(start=0, end=1, size=1 / nbins)) for c in cols])
    fig.update_layout(barmode="overlay", title="Fitted gate values", xaxis_title="gate",
                      yaxis_title="count of (seed, head)", template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- Figure 4
def chg_vs_cma(frame: Any) -> go.Figure:
    """CHG facilitation (y) against the causal-mediation effect (x) per head, mediating heads marked (Fig. 4).

    ``frame`` has columns ``layer, head, facilitation, effect, mediating`` (bool), e.g. from
    ``chg_lens.patching``. The title gives the mean facilitation of mediating and other heads.

    Example: ``plot.chg_vs_cma(patching_frame)``.
    """
    frame = _require(_as_frame(frame), CMA_COLUMNS, "chg_vs_cma")
    fig = go.Figure()
    for flag, name, color, symbol in ((False, "other heads", "#7f7f7f", "circle"),
                                      (True, "mediating heads", "#d62728", "diamond")):
        part = frame[frame.mediating.astype(bool) == flag]
        if part.empty:
            continue
        text = [f"layer {int(r.layer)}, head {int(r.head)}<br>facilitation {r.facilitation:.3f}<br>"
                f"effect {r.effect:.4g}<br>{name}" for r in part.itertuples()]
        fig.add_trace(go.Scatter(x=part["effect"], y=part["facilitation"], mode="markers", name=name,
                                 marker=dict(color=color, symbol=symbol, size=9 if flag else 6),
                                 hovertext=text, hoverinfo="text"))
    means = frame.groupby(frame.mediating.astype(bool))["facilitation"].mean()
    sub = ", ".join(f"{'mediating' if k else 'other'} {v:.3f}" for k, v in means.items())
    fig.update_layout(title=f"CHG facilitation vs causal mediation (mean facilitation: {sub})",
                      xaxis_title="CMA score (indirect effect)", yaxis_title="CHG facilitation (G-)",
                      yaxis_range=[-0.02, 1.02], template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- Figure 5
def contrastive_bars(frame: Any) -> go.Figure:
    """Accuracy per held-out task, gated vs default, per prompt format, with CI error bars (Fig. 5).

    ``frame`` has columns ``direction, heldout_task, format, gates, accuracy, ci_low, ci_high, n``
    (what ``experiments/_figure5.py`` computes from contrastive CHG fits): one panel row per ``direction`` (the retained format), one column per
    held-out task; x = ``gates`` (e.g. "default"/"gated"), colour = evaluation ``format``.

    Example: ``plot.contrastive_bars(pd.read_csv("contrastive.csv"))``.
    """
    frame = _require(_as_frame(frame), CONTRASTIVE_COLUMNS, "contrastive_bars")
    dirs, tasks_ = list(dict.fromkeys(frame.direction)), list(dict.fromkeys(frame.heldout_task))
    formats = list(dict.fromkeys(frame.format))
    palette = ["#d62728", "#17becf", "#9467bd", "#ff7f0e"]
    fig = make_subplots(rows=len(dirs), cols=len(tasks_), shared_yaxes=True,
                        subplot_titles=[f"{t}" if i == 0 else "" for i in range(len(dirs)) for t in tasks_],
                        row_titles=[str(d) for d in dirs])
    for i, d in enumerate(dirs):
        for j, t in enumerate(tasks_):
            for k, f in enumerate(formats):
                part = frame[(frame.direction == d) & (frame.heldout_task == t) & (frame.format == f)]
                if part.empty:
                    continue
                fig.add_trace(go.Bar(
                    x=part["gates"], y=part["accuracy"], name=str(f), legendgroup=str(f),
                    marker_color=palette[k % len(palette)], showlegend=(i == 0 and j == 0),
                    error_y=dict(type="data", symmetric=False, array=part["ci_high"] - part["accuracy"],
                                 arrayminus=part["accuracy"] - part["ci_low"]),
                    customdata=part[["ci_low", "ci_high", "n"]].to_numpy(),
                    hovertemplate=(f"retain {d}<br>held out {t}<br>format {f}<br>%{{x}}: %{{y:.1%}} "
                                   "[%{customdata[0]:.1%}, %{customdata[1]:.1%}], n=%{customdata[2]}<extra></extra>"),
                ), row=i + 1, col=j + 1)
    fig.update_layout(barmode="group", title="Contrastive CHG: accuracy with and without the gates (95% CI)",
                      template="plotly_white", height=280 * len(dirs) + 120)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%")
    return fig


# ----------------------------------------------------------------------------- method comparison
def _faithfulness_parts(curves: Any) -> tuple[pd.DataFrame, pd.Series, pd.Series, str | None]:
    """``(frame, cpr, cmd, metric name or None)`` of a ComparisonResult, a FaithfulnessResult or a frame."""
    from .faithfulness import FaithfulnessResult

    curves = getattr(curves, "faithfulness", curves)  # a ComparisonResult holds its FaithfulnessResult
    frame = _require(_as_frame(curves), FAITHFULNESS_COLUMNS, "faithfulness_curves")
    if not hasattr(curves, "cpr"):  # a frame: the areas as the faithfulness module defines them
        curves = FaithfulnessResult(frame=frame, baseline={}, meta={})
    cpr, cmd = curves.cpr(), curves.cmd()
    metric = (getattr(curves, "meta", None) or {}).get("metric")  # the name; the frame's column holds its values
    return frame, cpr, cmd, metric


def faithfulness_curves(curves: Any) -> go.Figure:
    """Faithfulness against the fraction of heads kept, one curve per method, CPR and CMD in each
    legend entry (the areas under ``f`` and under ``|1 - f|``, :mod:`chg_lens.faithfulness`).

    ``curves`` is a :class:`~chg_lens.compare.ComparisonResult`, a
    :class:`~chg_lens.faithfulness.FaithfulnessResult` or a frame with columns ``method, k,
    fraction, normalized`` (one row per method and k). For each method, the
    top-k heads of its ranking are kept and the others ablated; ``normalized`` = (m(top-k) -
    m(none kept)) / (m(all kept) - m(none kept)), so the full model is at 1 and the fully ablated
    one at 0 (dotted lines). Hover text names the method, k, the fraction and the value.

    Example: ``plot.faithfulness_curves(chg_lens.load("runs/compare"))``.
    """
    frame, cpr, cmd, metric = _faithfulness_parts(curves)
    fig = go.Figure()
    palette = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#aec7e8"]
    extra = 0
    for method in dict.fromkeys(frame["method"]):
        part = frame[frame["method"] == method].sort_values("fraction", kind="stable")
        color = METHOD_COLORS.get(str(method))
        if color is None:  # e.g. several CHG fits ("chg_2_seeds", "chg_10_seeds")
            color, extra = palette[extra % len(palette)], extra + 1
        text = [f"{method}<br>k = {int(r.k)} heads kept<br>fraction {float(r.fraction):.3f}<br>"
                f"faithfulness {float(r.normalized):.3f}" for r in part.itertuples()]
        fig.add_trace(go.Scatter(
            x=part["fraction"], y=part["normalized"], mode="lines+markers",
            name=f"{method} (CPR {float(cpr[method]):.3f}, CMD {float(cmd[method]):.3f})",
            line=dict(color=color, dash="dash" if method == "random" else "solid"),
            hovertext=text, hoverinfo="text",
        ))
    for y in (0.0, 1.0):
        fig.add_hline(y=y, line=dict(color="black", width=1, dash="dot"))
    fig.update_layout(title="Faithfulness: keep each method's top heads, ablate the rest"
                            + (f" ({metric})" if metric else ""),
                      xaxis_title="fraction of heads kept", yaxis_title="normalized faithfulness",
                      xaxis_range=[-0.02, 1.02], template="plotly_white", legend=dict(title="method"))
    return fig


# ----------------------------------------------------------------------------- export
def save_html(fig: go.Figure, path: str | os.PathLike, include_plotlyjs: bool | str = True) -> Path:
    """Write ``fig`` as a standalone HTML file (by a temporary name and one rename, so an
    interrupted write never leaves a half file). ``include_plotlyjs=True`` embeds plotly.js (works
    offline, ~4.5 MB); ``"cdn"`` links it from the plotly CDN (small file, needs internet).

    Example: ``plot.save_html(fig, "figure.html", include_plotlyjs="cdn")``.
    """
    if include_plotlyjs not in (True, "cdn"):
        raise ValueError(f"include_plotlyjs must be True (embedded) or 'cdn'; got {include_plotlyjs!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .results import write_text_atomic

    write_text_atomic(path, fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True))
    return path


def image_export_available() -> tuple[bool, str]:
    """Whether static image export works here, and if not, why (kaleido and a Chrome/Chromium)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, ("static image export needs kaleido: pip install kaleido (and a Chrome or Chromium "
                       "browser); save_html works without it")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")) and \
            not os.environ.get("BROWSER_PATH"):
        return False, ("kaleido is installed but no Chrome/Chromium was found: install one (e.g. apt-get install "
                       "chromium, or `plotly_get_chrome`) or set BROWSER_PATH; save_html works without it")
    return True, "ok"


def save_image(fig: go.Figure, path: str | os.PathLike, scale: float = 2.0) -> Path:
    """Write ``fig`` as a static image (png/svg/pdf by the file suffix) through kaleido.

    Raises a ``RuntimeError`` saying what to install when kaleido or a browser is missing.
    Example: ``plot.save_image(fig, "figure.png")``.
    """
    ok, why = image_export_available()
    if not ok:
        raise RuntimeError(why)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_image(str(path), scale=scale)
    return path
