"""A self-contained HTML report of a CHG results folder (``chg-lens report RESULTS_DIR``).

The folder holds one CHG result (``meta.json`` of kind "chg", as written by ``CHGResult.save`` or
``chg-lens fit``) or several in sub-folders, or a method comparison (kind "comparison", written by
``chg-lens compare``: the report then shows its faithfulness figure, its summary table and the
agreement between methods; its CHG fit, if any, gets the usual sections). Saved ablation results
(kind "ablation") below it are plotted too, and so are loose CSV/parquet tables whose columns match an ablation sweep
(:data:`chg_lens.plot.ABLATION_COLUMNS`), a CHG-vs-CMA frame (:data:`~chg_lens.plot.CMA_COLUMNS`)
or a contrastive accuracy frame (:data:`~chg_lens.plot.CONTRASTIVE_COLUMNS`).

Example::

    from chg_lens.report import write_report
    paths = write_report("runs/chg-smollm2-ioi")   # report.html, head_rankings.csv, report_summary.txt
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import taxonomy
from .chg import CHGResult

EXTRA_KINDS = ("ablation", "cma", "contrastive")


@dataclass
class ResultsFolder:
    """What :func:`find_results` found: CHG results by sub-folder, and extra frames by kind."""

    chg: dict[str, CHGResult] = field(default_factory=dict)
    comparisons: dict[str, Any] = field(default_factory=dict)
    """Method comparisons (``chg_lens.compare.ComparisonResult``) by sub-folder."""
    extras: dict[str, list[tuple[str, pd.DataFrame]]] = field(default_factory=lambda: {k: [] for k in EXTRA_KINDS})
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, why) of every result or table that could not be read and is not in the report."""


class ReportPaths(dict):
    """The written files by name (``html``, ``rankings``, ``summary``); ``skipped`` lists (path, why)
    of what could not be read."""

    skipped: list[tuple[str, str]]


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def result_name(root: Path, folder: Path) -> str:
    """A result's name in the report: its folder below ``root``, or the name of ``root`` itself when
    the result is saved there (``chg-lens report runs/chg-smollm2-ioi`` names it ``chg-smollm2-ioi``)."""
    rel = folder.relative_to(root)
    return str(rel) if rel.parts else (root.resolve().name or str(root.resolve()))


def find_results(results_dir: str | os.PathLike) -> ResultsFolder:
    """Every saved result below ``results_dir``, discovered by the ``kind`` in its ``meta.json``:
    CHG results (kind "chg"), and ablation results (kind "ablation") whose frame is an ablation
    sweep, and method comparisons (kind "comparison"). Loose tables (CSV or parquet, not part of a
    saved result; a parquet file wins over the CSV of the same name) whose columns match a CHG-vs-CMA
    or contrastive accuracy frame are plotted too. Raises ``ValueError`` when there is neither a CHG
    result nor a comparison."""
    from . import plot
    from .results import load, read_meta

    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    found = ResultsFolder()
    owned: set[Path] = set()  # folders of saved results: their own files are not loose tables
    for meta in sorted(root.rglob("meta.json")):
        if "checkpoint" in meta.relative_to(root).parts:
            continue
        owned.add(meta.parent)
        name = result_name(root, meta.parent)
        try:
            kind = read_meta(meta.parent).get("kind")
            if kind == "chg":
                found.chg[name] = CHGResult.load(meta.parent)
            elif kind == "comparison":
                found.comparisons[name] = load(meta.parent)
            elif kind == "ablation":
                frame = load(meta.parent).frame
                if all(c in frame.columns for c in plot.ABLATION_COLUMNS) and len(frame):
                    found.extras["ablation"].append((name, frame))
        except (ValueError, OSError) as err:  # listed, never silently left out
            found.skipped.append((str(meta.parent), " ".join(str(err).split())))
    if not found.chg and not found.comparisons:
        why = "".join(f"; skipped {p}: {w}" for p, w in found.skipped)
        raise ValueError(f"no CHG result below {root}: expected a folder written by `chg-lens fit` or "
                         f"CHGResult.save (meta.json + tensors.safetensors), or by `chg-lens compare`{why}")
    columns = {"ablation": plot.ABLATION_COLUMNS, "cma": plot.CMA_COLUMNS, "contrastive": plot.CONTRASTIVE_COLUMNS}
    tables = sorted([*root.rglob("*.csv"), *root.rglob("*.parquet")])
    for path in tables:
        if path.name in ("scores.csv", "head_rankings.csv") or "checkpoint" in path.relative_to(root).parts \
                or path.parent in owned:
            continue
        if path.suffix == ".csv" and path.with_suffix(".parquet") in tables:
            continue  # the same table twice: read the parquet file
        try:
            frame = _read_table(path)
        except Exception as err:  # noqa: BLE001 - any reader error: listed as skipped, not hidden
            found.skipped.append((str(path), f"not a readable table ({type(err).__name__}: {' '.join(str(err).split())})"))
            continue
        for kind, cols in columns.items():
            if all(c in frame.columns for c in cols) and len(frame):
                found.extras[kind].append((str(path.relative_to(root)), frame))
                break
    return found


def head_rankings(scores: pd.DataFrame) -> pd.DataFrame:
    """Per head (and model/task): mean gates and scores over seeds, always/any aggregates, role,
    and ``rank_<score>`` (1 = highest mean score within its model/task), sorted by facilitation.

    Example: ``head_rankings(result.scores()).head(10)``.
    """
    from .plot import head_table

    table = head_table(scores)
    by = [c for c in ("model", "task") if c in table.columns]
    for s in taxonomy.SCORES:
        ranks = table.groupby(by)[f"mean_{s}"].rank(ascending=False, method="first") if by else \
            table[f"mean_{s}"].rank(ascending=False, method="first")
        table[f"rank_{s}"] = ranks.astype(int)
    return table.sort_values(by + ["rank_facilitation"]).reset_index(drop=True)


def _summary(found: ResultsFolder, scores: pd.DataFrame) -> str:
    lines = []
    for name, res in found.chg.items():
        lines += [f"[{name}]", res.summary(), ""]
    for name, cmp in found.comparisons.items():
        lines += [f"[{name}]", cmp.summary(), ""]
    if len(scores) and scores.model.nunique() > 1:
        c = taxonomy.cross_model_consistency(scores)
        if len(c):
            lines.append(f"cross-model consistency (Pearson r of score CDFs): min {c.pearson.min():.3f}, "
                         f"mean {c.pearson.mean():.3f} over {len(c)} pairs")
    for kind, items in found.extras.items():
        for path, frame in items:
            lines.append(f"{kind}: {path} ({len(frame)} rows)")
    for path, why in found.skipped:
        lines.append(f"SKIPPED {path}: {why}")
    return "\n".join(lines).strip() + "\n"


def _all_scores(found: ResultsFolder, frame_of) -> pd.DataFrame:
    """The CHG results' frames concatenated (an empty frame when the folder holds only comparisons)."""
    frames = [frame_of(r) for r in found.chg.values()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "task"])


ERROR_HOOK = """<script>
window.__chgErrors = [];
function __chgLog(msg) {
  window.__chgErrors.push(String(msg));
  var el = document.getElementById('script-errors');
  if (el) { el.textContent = window.__chgErrors.join('\\n'); el.setAttribute('data-count', window.__chgErrors.length); }
}
window.addEventListener('error', function (e) { __chgLog('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { __chgLog('rejection: ' + e.reason); });
</script>"""


def render_html(found: ResultsFolder, title: str = "CHG report") -> str:
    """The report page as a string: plotly.js embedded once, then figures, tables and metadata."""
    import plotly.offline

    from . import plot

    scores = _all_scores(found, lambda r: r.scores())
    parts: list[str] = []
    n_fig = 0

    def fig(f, caption: str) -> None:
        nonlocal n_fig
        n_fig += 1
        parts.append(f"<figure>{f.to_html(full_html=False, include_plotlyjs=False, div_id=f'fig{n_fig}')}"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(frame: pd.DataFrame, caption: str) -> None:
        parts.append(f"<h3>{html.escape(caption)}</h3>" + frame.to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                          classes="tbl", border=0))

    diagnostics = {name: res.diagnostics() for name, res in found.chg.items()}
    unconverged = {name: res.convergence_warning() for name, res in found.chg.items()
                   if not diagnostics[name].attrs["converged"]}
    banner = ""
    if unconverged:  # only when some fit did not converge
        items = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(msg)}</li>" for name, msg in unconverged.items())
        banner = (f"<div id='not-converged' class='banner'><b>Not converged: {len(unconverged)} of {len(found.chg)} "
                  f"fit(s) did not settle or lost the task, so their roles are not yet reliable.</b><ul>{items}</ul></div>")
    parts.append(f"<h2>Summary</h2><pre class='summary'>{html.escape(_summary(found, scores))}</pre>")
    if len(found.chg) > 1:
        fig(plot.score_cdf(scores), "Empirical CDF of each score per model/task (paper Fig. 3a).")
    for name, res in found.chg.items():
        label = f"{res.meta.get('model')} / {res.meta.get('task')}"
        parts.append(f"<h2>{html.escape(label)} <small>({html.escape(name)})</small></h2>")
        d = diagnostics[name]
        table(d, f"Convergence diagnostics ({'converged' if d.attrs['converged'] else 'NOT converged'}): per stage "
                 "and seed, gate movement and NLL slope over the last 10% of the stage's updates; G0 against the "
                 "ungated model (docs/diagnostics.md)")
        table(pd.DataFrame([{k: d.attrs[k] for k in ("role_agreement", "spearman_g_plus", "spearman_g_minus")}]),
              "Seed agreement: share of heads with the same role in every seed, mean pairwise Spearman of G+ and G-")
        fig(plot.convergence(res), "NLL per update and share of gates still moving between snapshots; "
                                   "shaded: each stage's diagnostic window.")
        fig(plot.trajectories(res), "Gate trajectories of the top head per score, seed 0 (Fig. 1b).")
        fig(plot.gate_scatter(res), "G+ against G- per (seed, head), coloured by layer (Fig. 1c).")
        fig(plot.role_map(res), "Interference (red) and facilitation (green), always/any over seeds (Fig. 3b).")
        if len(found.chg) == 1:
            fig(plot.score_cdf(res), "Empirical CDF of each score across heads and seeds (Fig. 3a).")
        for value in ("facilitation", "interference", "irrelevance", "g0"):
            fig(plot.heatmap(res, value), f"{value}, mean over seeds.")
        fig(plot.layer_importance(res), "Mean score per layer.")
        fig(plot.gate_histograms(res), "Distribution of fitted gates.")
        table(res.percent_above(0.5), "Percent of heads with score >= 0.5, always / any seed (Table 2)")
        if res.validation is not None:
            table(res.validation.groupby("gates", sort=False)[["logprob", "accuracy"]].mean().reset_index(),
                  "Validation: target log-probability and accuracy (mean over seeds)")
        table(head_rankings(res.scores()).head(15)[["layer", "head", "role"] + [f"mean_{s}" for s in taxonomy.SCORES]
                                                + ["always_facilitation", "any_interference"]],
              "Top 15 heads by mean facilitation")
        meta = {"config": res.config, "meta": res.meta}
        parts.append(f"<details><summary>Run metadata</summary><pre>{html.escape(json.dumps(meta, indent=2, default=str))}"
                     "</pre></details>")
    for name, cmp in found.comparisons.items():
        label = f"{cmp.meta.get('model')} / {cmp.meta.get('task')}"
        parts.append(f"<h2 class='comparison'>Method comparison: {html.escape(label)} "
                     f"<small>({html.escape(name)})</small></h2>")
        fig(plot.faithfulness_curves(cmp), "Faithfulness of each method's ranking: the top-k heads kept, the others "
                                           f"{cmp.meta.get('ablation')}-ablated, on {cmp.meta.get('n_validation')} "
                                           "held-out rows; CPR = area under the curve (higher is better), CMD = area "
                                           "under |1 - f| (lower is better).")
        table(cmp.table(), f"Methods: wall time to rank the heads (s), CPR, CMD ({cmp.meta.get('metric')})"
                           + (" and agreement with activation patching" if "patching" in cmp.methods else ""))
        if len(cmp.agreement):
            table(cmp.agreement.rename(columns={"top_k_overlap": f"top{cmp.top_k}_overlap"}),
                  f"Agreement between methods: Spearman over heads of the head scores, share of the top {cmp.top_k} "
                  "heads in common")
    makers = {"ablation": (plot.ablation_curves, "Change in target log-probability as heads are ablated in score order (Fig. 2)."),
              "cma": (plot.chg_vs_cma, "CHG facilitation against causal mediation score (Fig. 4)."),
              "contrastive": (plot.contrastive_bars, "Contrastive CHG accuracy, gated vs default (Fig. 5).")}
    for kind, items in found.extras.items():
        for path, frame in items:
            parts.append(f"<h2>{kind}: {html.escape(path)}</h2>")
            fig(makers[kind][0](frame), makers[kind][1])
    js = plotly.offline.get_plotlyjs()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "pre{white-space:pre-wrap;overflow-wrap:anywhere}"  # long summary lines wrap inside the page
             ".tbl{border-collapse:collapse;font-size:13px}.tbl td,.tbl th{padding:2px 8px;border-bottom:1px solid #ddd}"
             "figcaption{color:#555;font-size:14px}#script-errors:empty{display:none}#script-errors{color:#b00}"
             ".banner{background:#fff3cd;border:2px solid #d9a400;padding:0.6em 1em;margin:1em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style>{ERROR_HOOK}<script type='text/javascript'>{js}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>{banner}<pre id='script-errors' data-count='0'></pre>"
            f"<p data-figures='{n_fig}'>{n_fig} figures.</p>" + "\n".join(parts) + "</body></html>")


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> ReportPaths:
    """Write ``report.html`` (self-contained, works offline), ``head_rankings.csv`` (when the folder
    holds a CHG result) and ``report_summary.txt`` to ``out`` (default: ``results_dir``); returns their paths, with
    ``.skipped`` listing the results and tables that could not be read (also in the summary).

    Example: ``write_report("runs/chg-smollm2-ioi")["html"]``.
    """
    found = find_results(results_dir)
    out = Path(out) if out is not None else Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .plot import gate_frame

    scores = _all_scores(found, gate_frame)
    from .results import write_text_atomic

    paths = ReportPaths(html=out / "report.html", rankings=out / "head_rankings.csv", summary=out / "report_summary.txt")
    if not found.chg:  # only comparisons: no CHG head rankings
        del paths["rankings"]
    paths.skipped = list(found.skipped)
    write_text_atomic(paths["html"], render_html(found, title=f"CHG report: {Path(results_dir).resolve().name}"))
    if found.chg:
        write_text_atomic(paths["rankings"], head_rankings(scores).to_csv(index=False))
    write_text_atomic(paths["summary"], _summary(found, scores))
    return paths
