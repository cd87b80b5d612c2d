"""``report.md`` and ``summary.csv``: one row per head with its explanation, scores, cluster, label
and probe scores (``probe_<name>``, from ``probes.parquet``) and, given a CHG result folder, its
facilitation / interference / irrelevance and role for that task. The report also shows the probe
agreement (:func:`chg_lens.explain.simulate.probe_agreement`): does the label predict the probe?

Example::

    summary = build_summary(records, scores, clusters, chg_result="runs/ioi")
    write_explain_report(summary, "out/", title="SmolLM2 heads")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .. import taxonomy
from .probes import PROBES, REFERENCES
from .simulate import probe_agreement

SUMMARY_COLUMNS = ["layer", "head", "explanation", "status", "simulation_score", "detection_score", "cluster"]


def chg_head_scores(chg_result: Any) -> tuple[pd.DataFrame, str]:
    """Per head, the mean over seeds of the three CHG scores and the role they give; and the task name."""
    from ..chg import CHGResult

    result = chg_result if isinstance(chg_result, CHGResult) else CHGResult.load(chg_result)
    scores = result.scores()
    per_head = scores.groupby(["layer", "head"], sort=True)[list(taxonomy.SCORES)].mean().reset_index()
    per_head["role"] = taxonomy.frame_roles(per_head)
    return per_head, str(result.meta.get("task", "the task"))


def build_summary(records: list[dict[str, Any]], scores: pd.DataFrame, clusters: dict[str, Any] | None,
                  chg_result: Any = None, probes: pd.DataFrame | None = None) -> tuple[pd.DataFrame, str | None]:
    """The summary table (one row per explained head) and the CHG task name (None without CHG)."""
    rows = [{"layer": r["layer"], "head": r["head"], "explanation": r.get("explanation", ""),
             "status": r.get("status", "ok")} for r in records]
    frame = pd.DataFrame(rows, columns=["layer", "head", "explanation", "status"])
    extra = [c for c in ("label", "probe_score", "probe_percentile") if c in scores.columns]
    sc = scores[["layer", "head", "simulation_score", "detection_score", *extra]]
    frame = frame.merge(sc, on=["layer", "head"], how="left")
    if probes is not None:
        frame = frame.merge(probes[["layer", "head", *PROBES]].rename(columns={p: f"probe_{p}" for p in PROBES}),
                            on=["layer", "head"], how="left")
    labels = (clusters or {}).get("labels", {})
    frame["cluster"] = [int(labels.get(f"{l}.{h}", -1)) for l, h in zip(frame["layer"], frame["head"])]
    task = None
    if chg_result is not None:
        per_head, task = chg_head_scores(chg_result)
        frame = frame.merge(per_head, on=["layer", "head"], how="left")
        frame["task"] = task
        frame["sentence"] = [_sentence(r, task) for r in frame.itertuples()]
    return frame.sort_values(["layer", "head"], kind="stable").reset_index(drop=True), task


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _sentence(r, task: str) -> str:
    what = r.explanation if r.status == "ok" and r.explanation else "its explanation failed"
    role = r.role if isinstance(r.role, str) else "not in the CHG result"
    return f"layer {r.layer} head {r.head} is {role} for {task}: {what} (simulation score {_fmt(r.simulation_score)})"


def probe_lines(summary: pd.DataFrame) -> list[str]:
    """The report's probe sections: per-head probe scores beside the label, and the agreement per label."""
    cols = [f"probe_{p}" for p in PROBES]
    if not all(c in summary.columns for c in cols):
        return []
    lines = ["## Probe scores", "",
             "Repeated random token sequences (see docs/explain.md): " +
             "; ".join(f"{p.replace('_', ' ')}: {REFERENCES[p]}" for p in PROBES) + ".", "",
             "| layer | head | label | " + " | ".join(p.replace("_", " ") for p in PROBES) + " |",
             "|---|---|---|" + "---|" * len(PROBES)]
    for r in summary.itertuples():
        label = getattr(r, "label", "") if isinstance(getattr(r, "label", ""), str) else ""
        lines.append(f"| {r.layer} | {r.head} | {label} | " +
                     " | ".join(_fmt(getattr(r, c)) for c in cols) + " |")
    if "label" in summary.columns:
        probes = summary[["layer", "head", *cols]].rename(columns={f"probe_{p}": p for p in PROBES})
        agree = probe_agreement(summary, probes)
        lines += ["", "## Probe agreement: does the label predict the probe score?", "",
                  "| label | heads | mean probe score (label) | mean probe score (other heads) | AUROC |",
                  "|---|---|---|---|---|"]
        lines += [f"| {a.label} | {a.n_heads} | {_fmt(a.mean_probe)} | {_fmt(a.mean_probe_others)} | {_fmt(a.auroc)} |"
                  for a in agree.itertuples()]
        if not len(agree):
            lines.append("| (no head carries a label that has a probe) | | | | |")
    return lines + [""]


def markdown(summary: pd.DataFrame, clusters: dict[str, Any] | None, task: str | None, title: str,
             settings: dict[str, Any]) -> str:
    """The report as Markdown (deterministic: the same inputs give the same bytes)."""
    ok = summary[summary.status == "ok"]
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += [f"- heads explained: {len(ok)} of {len(summary)}",
              f"- mean simulation score: {_fmt(float(ok.simulation_score.mean()) if len(ok) else float('nan'))}",
              f"- mean detection score: {_fmt(float(ok.detection_score.mean()) if len(ok) else float('nan'))}", ""]
    if task is not None:
        lines += [f"## Heads and their CHG roles for {task}", ""]
        lines += [f"- {s}" for s in summary.sort_values("simulation_score", ascending=False, kind="stable").sentence]
        lines.append("")
    lines += ["## Heads", "", "| layer | head | simulation | detection | cluster | " +
              ("role | facilitation | interference | irrelevance | " if task is not None else "") + "explanation |",
              "|---|---|---|---|---|" + ("---|---|---|---|" if task is not None else "") + "---|"]
    for r in summary.itertuples():
        chg = (f"{r.role} | {_fmt(r.facilitation)} | {_fmt(r.interference)} | {_fmt(r.irrelevance)} | "
               if task is not None else "")
        text = (r.explanation if r.status == "ok" else "(failed)").replace("|", "\\|")
        lines.append(f"| {r.layer} | {r.head} | {_fmt(r.simulation_score)} | {_fmt(r.detection_score)} | "
                     f"{r.cluster} | {chg}{text} |")
    lines += [""] + probe_lines(summary)
    lines += ["## Clusters", ""]
    for c in (clusters or {}).get("clusters", []):
        lines.append(f"- cluster {c['id']} ({c['size']} heads: {', '.join(c['heads'])}): {c['exemplar']}")
    if clusters is not None:
        lines.append(f"- unclustered (noise): {clusters.get('n_noise', 0)} heads")
    return "\n".join(lines) + "\n"


def write_explain_report(summary: pd.DataFrame, outdir: str | os.PathLike, clusters: dict[str, Any] | None = None,
                         task: str | None = None, title: str = "Head explanations",
                         settings: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``report.md`` into ``outdir``, each by a temporary name and one
    rename (an interrupted write never leaves a half file); the CHG HTML report is
    :func:`chg_lens.report.write_report`."""
    from ..results import write_text_atomic

    outdir = Path(outdir)
    csv = outdir / "summary.csv"
    write_text_atomic(csv, summary.to_csv(index=False, float_format="%.6g"))
    md = outdir / "report.md"
    write_text_atomic(md, markdown(summary, clusters, task, title, settings or {}))
    return md, csv


def write_report(*args, **kwargs) -> tuple[Path, Path]:
    """Deprecated name of :func:`write_explain_report` (kept for one release)."""
    import warnings

    warnings.warn("chg_lens.explain.write_report is now write_explain_report", DeprecationWarning, stacklevel=2)
    return write_explain_report(*args, **kwargs)
