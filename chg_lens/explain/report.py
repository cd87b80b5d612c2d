"""``report.md`` and ``summary.csv``: one row per head with its explanation, scores, cluster, label
and probe scores (``probe_<name>``, from ``probes.parquet``) and, given a CHG result folder, its
facilitation / interference / irrelevance and role for that task. The report also shows the probe
agreement (:func:`chg_lens.explain.simulate.probe_agreement`): does the label predict the probe?

Example::

    summary = build_summary(records, scores, clusters, chg_result="runs/ioi")
    write_explain_report(summary, "out/", title="SmolLM2 heads")
"""

from __future__ import annotations

import html
import math
import os
import re
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


def check_chg_model(chg_result: Any, model_meta: dict[str, Any], where: Any = None,
                    heads: list[tuple[int, int]] | None = None) -> None:
    """Raise a ValueError unless ``chg_result`` was fitted on the explained model: the same layers x
    heads, and the same weights (:func:`chg_lens.models.weights_fingerprint`, when both record it) or
    else the same model name; the recorded ``heads`` must lie inside the fit's shape. ``model_meta``
    is what the recording stores (``model``, ``n_layers``, ``n_heads``, ``weights``).

    Example::

        check_chg_model(CHGResult.load("runs/ioi"), load_raw("runs/explain/raw_events.parquet").meta)
    """
    from ..chg import CHGResult

    chg = chg_result if isinstance(chg_result, CHGResult) else CHGResult.load(chg_result)
    flag = "the CHG result" if where is None else f"--chg-result {where}"
    fit_model, model = chg.meta.get("model"), model_meta.get("model")
    L, H = (int(n) for n in chg.logits["g0"].shape[1:])
    shape = (model_meta.get("n_layers"), model_meta.get("n_heads"))
    todo = "pass a CHG result fitted on the explained model"
    if None not in shape and (int(shape[0]), int(shape[1])) != (L, H):
        raise ValueError(f"{flag} is a fit of a model with {L} layers x {H} heads ({fit_model}); the explained model "
                         f"({model}) has {shape[0]} x {shape[1]}: {todo}")
    outside = [f"L{l}H{h}" for l, h in heads or [] if not (0 <= l < L and 0 <= h < H)]
    if outside:
        raise ValueError(f"{flag} has {L} layers x {H} heads; the recorded heads {', '.join(outside[:5])} lie outside "
                         f"it: {todo}")
    a, b = chg.meta.get("weights"), model_meta.get("weights")
    if a and b:
        if a != b:
            raise ValueError(f"{flag} was fitted on other weights (fingerprint {a}, model {fit_model}) than the "
                             f"explained model {model} ({b}): {todo}")
    elif fit_model is not None and model is not None and fit_model != model:
        raise ValueError(f"{flag} is a fit of {fit_model!r}, not of the explained model {model!r}: {todo}")


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


_SCHEME = re.compile(r"(?i)\b(javascript|vbscript|data|file)(\s*):")


def md_text(text: Any) -> str:
    r"""``text`` made inert for a Markdown file, on one line: HTML escaped (Markdown viewers, Jupyter
    included, render raw HTML such as ``<script>`` or ``<img onerror=...>``), link and table syntax
    (``[``, ``]``, ``|`` and backslashes) escaped, and URL schemes that run code (``javascript:``)
    broken. Applied to every free text the report shows, explanations written by an LLM among them.

    Example::

        md_text("<b>hi</b> [x](javascript:alert(1))")
        # '&lt;b&gt;hi&lt;/b&gt; \[x\](javascript&#58;alert(1))'
    """
    s = " ".join(str(text).split())
    s = html.escape(s.replace("\\", "\\\\"), quote=True)
    s = _SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}&#58;", s)
    for ch in "[]|":
        s = s.replace(ch, "\\" + ch)
    return s


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""A spreadsheet reads a cell starting with one of these as a formula (CSV injection)."""


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells that a spreadsheet would run as a formula (starting with
    ``= + - @``, tab or CR) start with a ``'`` instead; numbers are untouched."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = [("'" + v) if isinstance(v, str) and v.startswith(FORMULA_START) else v for v in out[col]]
    return out


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
        lines.append(f"| {r.layer} | {r.head} | {md_text(label)} | " +
                     " | ".join(_fmt(getattr(r, c)) for c in cols) + " |")
    if "label" in summary.columns:
        probes = summary[["layer", "head", *cols]].rename(columns={f"probe_{p}": p for p in PROBES})
        agree = probe_agreement(summary, probes)
        lines += ["", "## Probe agreement: does the label predict the probe score?", "",
                  "| label | heads | mean probe score (label) | mean probe score (other heads) | AUROC |",
                  "|---|---|---|---|---|"]
        lines += [f"| {md_text(a.label)} | {a.n_heads} | {_fmt(a.mean_probe)} | {_fmt(a.mean_probe_others)} | "
                  f"{_fmt(a.auroc)} |"
                  for a in agree.itertuples()]
        if not len(agree):
            lines.append("| (no head carries a label that has a probe) | | | | |")
    return lines + [""]


def markdown(summary: pd.DataFrame, clusters: dict[str, Any] | None, task: str | None, title: str,
             settings: dict[str, Any]) -> str:
    """The report as Markdown (deterministic: the same inputs give the same bytes). Every free text
    (explanations, labels, names, settings) goes through :func:`md_text`, so none renders as HTML or
    a link."""
    ok = summary[summary.status == "ok"]
    lines = [f"# {md_text(title)}", ""]
    lines += [f"- {md_text(k)}: {md_text(v)}" for k, v in settings.items()]
    lines += [f"- heads explained: {len(ok)} of {len(summary)}",
              f"- mean simulation score: {_fmt(float(ok.simulation_score.mean()) if len(ok) else float('nan'))}",
              f"- mean detection score: {_fmt(float(ok.detection_score.mean()) if len(ok) else float('nan'))}", ""]
    if task is not None:
        lines += [f"## Heads and their CHG roles for {md_text(task)}", ""]
        lines += [f"- {md_text(s)}" for s in summary.sort_values("simulation_score", ascending=False,
                                                                 kind="stable").sentence]
        lines.append("")
    lines += ["## Heads", "", "| layer | head | simulation | detection | cluster | " +
              ("role | facilitation | interference | irrelevance | " if task is not None else "") + "explanation |",
              "|---|---|---|---|---|" + ("---|---|---|---|" if task is not None else "") + "---|"]
    for r in summary.itertuples():
        chg = (f"{md_text(r.role)} | {_fmt(r.facilitation)} | {_fmt(r.interference)} | {_fmt(r.irrelevance)} | "
               if task is not None else "")
        text = md_text(r.explanation if r.status == "ok" else "(failed)")
        lines.append(f"| {r.layer} | {r.head} | {_fmt(r.simulation_score)} | {_fmt(r.detection_score)} | "
                     f"{r.cluster} | {chg}{text} |")
    lines += [""] + probe_lines(summary)
    lines += ["## Clusters", ""]
    for c in (clusters or {}).get("clusters", []):
        heads = md_text(", ".join(map(str, c["heads"])))
        lines.append(f"- cluster {md_text(c['id'])} ({md_text(c['size'])} heads: {heads}): {md_text(c['exemplar'])}")
    if clusters is not None:
        lines.append(f"- unclustered (noise): {md_text(clusters.get('n_noise', 0))} heads")
    return "\n".join(lines) + "\n"


def write_explain_report(summary: pd.DataFrame, outdir: str | os.PathLike, clusters: dict[str, Any] | None = None,
                         task: str | None = None, title: str = "Head explanations",
                         settings: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``report.md`` into ``outdir``, each by a temporary name and one
    rename (an interrupted write never leaves a half file); the CHG HTML report is
    :func:`chg_lens.report.write_report`. ``report.md`` shows free text through :func:`md_text`;
    ``summary.csv`` keeps it as written, except that a text cell a spreadsheet would run as a
    formula starts with a ``'`` (:func:`csv_safe`)."""
    from .. import store

    outdir = Path(outdir)
    texts = report_texts(summary, clusters, task, title, settings)
    for name, text in texts.items():
        store.write_text(outdir / name, text)
    return outdir / "report.md", outdir / "summary.csv"


def report_texts(summary: pd.DataFrame, clusters: dict[str, Any] | None = None, task: str | None = None,
                 title: str = "Head explanations", settings: dict[str, Any] | None = None) -> dict[str, str]:
    """The texts of ``summary.csv`` and ``report.md`` (what :func:`write_explain_report` writes and an
    explain result's save writes into its folder), by file name."""
    return {"summary.csv": csv_safe(summary).to_csv(index=False, float_format="%.6g"),
            "report.md": markdown(summary, clusters, task, title, settings or {})}


def write_report(*args, **kwargs) -> tuple[Path, Path]:
    """Deprecated name of :func:`write_explain_report` (kept for one release)."""
    import warnings

    warnings.warn("chg_lens.explain.write_report is now write_explain_report", DeprecationWarning, stacklevel=2)
    return write_explain_report(*args, **kwargs)
