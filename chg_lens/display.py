"""What a notebook shows for a result: the HTML of ``result._repr_html_()``.

Small pure functions on strings, numbers and frames (no plotly, no model, no other chg_lens
module): a title, the result's summary text, a convergence banner for fits and one compact table,
every piece of text escaped. :meth:`chg_lens.results.Result._repr_html_` calls
:func:`notebook_html`, so a bare ``result`` in a Jupyter or Colab cell shows them::

    result = chg_lens.fit_chg(model, train, validation=val)
    result          # summary, a green "converged" or red "NOT converged" banner, the role map
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

GREEN, RED, GREY = "#d8f0d8", "#f6d5d5", "#eeeeee"
ROLE_STYLE = {"facilitating": ("F", GREEN), "interfering": ("I", RED), "irrelevant": ("·", GREY)}
"""Role name -> (the letter in a role map cell, its background)."""

STYLE = ("font-family:sans-serif;font-size:13px;max-width:100%")
PRE = "white-space:pre-wrap;overflow-wrap:anywhere;margin:0.4em 0;font-size:12px"
CELL = "padding:1px 6px;border-bottom:1px solid #ddd;text-align:right"


def escape(value: Any) -> str:
    """``str(value)`` with ``& < > " '`` escaped."""
    return html.escape(str(value), quote=True)


def number(value: Any, digits: int = 4) -> str:
    """A table cell's text: floats to ``digits`` significant digits, everything else as ``str``."""
    if isinstance(value, bool) or not isinstance(value, float):
        try:  # numpy scalars
            if hasattr(value, "item") and isinstance(value.item(), float):
                value = value.item()
            else:
                return str(value)
        except (TypeError, ValueError):
            return str(value)
    return "nan" if math.isnan(value) else f"{value:.{digits}g}"


def banner(advice: str | None) -> str:
    """A fit's convergence banner: green "converged" when ``advice`` is empty, red "NOT converged"
    with the one-line advice otherwise; nothing for ``None`` (a result that is not a fit)."""
    if advice is None:
        return ""
    if not advice:
        return (f"<div class='chg-converged' style='background:{GREEN};border:1px solid #3a3;padding:4px 8px;"
                "margin:4px 0'><b>converged</b>: every stage of every seed settled</div>")
    return (f"<div class='chg-not-converged' style='background:{RED};border:1px solid #c33;padding:4px 8px;"
            f"margin:4px 0'><b>NOT converged</b>: {escape(advice)}</div>")


def table(frame, *, max_rows: int = 10, caption: str = "") -> str:
    """The first ``max_rows`` rows of a DataFrame as a small HTML table (index left out); every
    header and cell escaped, floats to 4 significant digits; a last line says how many rows are left out."""
    shown = frame.head(max_rows)
    head = "".join(f"<th style='{CELL}'>{escape(c)}</th>" for c in shown.columns)
    body = "".join("<tr>" + "".join(f"<td style='{CELL}'>{escape(number(v))}</td>" for v in row) + "</tr>"
                   for row in shown.itertuples(index=False, name=None))
    more = len(frame) - len(shown)
    foot = f"<div style='color:#666'>... {more} more row(s)</div>" if more > 0 else ""
    cap = f"<caption style='text-align:left;color:#555'>{escape(caption)}</caption>" if caption else ""
    return (f"<table class='chg-table' style='border-collapse:collapse'>{cap}<thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{foot}")


def grid(cells: Sequence[Sequence[tuple[str, str, str]]], *, caption: str = "") -> str:
    """A layer x head map: ``cells[layer][head] = (text, background, tooltip)``, layer 0 at the top."""
    n_heads = max((len(r) for r in cells), default=0)
    head = "<th></th>" + "".join(f"<th style='padding:0 3px;font-weight:normal'>{h}</th>" for h in range(n_heads))
    rows = []
    for layer, row in enumerate(cells):
        tds = "".join(f"<td title='{escape(tip)}' style='background:{escape(bg)};padding:0 3px;text-align:center;"
                      f"min-width:1.2em'>{escape(text)}</td>" for text, bg, tip in row)
        rows.append(f"<tr><th style='padding:0 4px;font-weight:normal;text-align:right'>L{layer}</th>{tds}</tr>")
    cap = f"<caption style='text-align:left;color:#555'>{escape(caption)}</caption>" if caption else ""
    return (f"<table class='chg-grid' style='border-collapse:collapse;font-family:monospace;font-size:11px'>{cap}"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def result_html(title: str, *, summary: str = "", advice: str | None = None, body: str = "") -> str:
    """One result's notebook view: ``title``, the convergence :func:`banner` (``advice``; None: not
    a fit), the ``summary`` text (wrapped, never wider than the cell) and ``body`` (already HTML,
    e.g. :func:`table` or :func:`grid`)."""
    text = f"<pre class='chg-summary' style='{PRE}'>{escape(summary)}</pre>" if summary else ""
    return (f"<div class='chg-result' style='{STYLE}'><b>{escape(title)}</b>{banner(advice)}{text}{body}</div>")


RANK_COLUMNS = ("effect", "delta_logprob")
"""A one-row-per-head table is shown ranked by the first of these columns it has (largest absolute value first)."""


def ranked_table(frame, *, max_rows: int = 10) -> str:
    """:func:`table` of a result's frame: heads ranked by the first of :data:`RANK_COLUMNS` (by
    absolute value, largest first), or the first rows as they are (a sequential ablation's steps)."""
    column = next((c for c in RANK_COLUMNS if c in frame.columns), None)
    if column is None or "step" in frame.columns:
        return table(frame, max_rows=max_rows, caption=f"first {min(max_rows, len(frame))} of {len(frame)} rows")
    order = frame[column].abs().sort_values(ascending=False, kind="stable").index
    return table(frame.loc[order], max_rows=max_rows,
                 caption=f"top {min(max_rows, len(frame))} of {len(frame)} rows by |{column}|")


def frame_summary(result) -> str:
    """The summary of a result that has none of its own (ablation, patching, new kinds): kind,
    model, task, rows, the baseline metrics and, when the frame labels them, the mediating heads."""
    meta, frame = getattr(result, "meta", {}) or {}, result.to_frame()
    about = " / ".join(str(meta[k]) for k in ("model", "task") if meta.get(k) is not None)
    lines = [f"{result.kind}{' on ' + about if about else ''}: {len(frame)} rows"
             + "".join(f", {k} {meta[k]}" for k in ("mode", "method", "metric", "corruption") if meta.get(k) is not None)]
    baseline = getattr(result, "baseline", None)
    if baseline:
        lines.append("  baseline: " + ", ".join(f"{k} {number(v)}" for k, v in baseline.items()))
    if {"mediating", "layer", "head"} <= set(frame.columns):
        med = frame[frame["mediating"].astype(bool)]
        heads = ", ".join(f"L{int(l)}H{int(h)}" for l, h in zip(med["layer"], med["head"]))
        lines.append(f"  mediating heads: {len(med)}" + (f" ({heads})" if len(med) else ""))
    return "\n".join(lines)


def notebook_html(result) -> str:
    """A result's notebook view (:meth:`chg_lens.results.Result._repr_html_`): its ``summary()`` (or
    :func:`frame_summary`), the banner of its ``convergence_warning()`` when it is a fit, and its
    ``_html_body()`` (or :func:`ranked_table` of ``to_frame()``)."""
    summary = result.summary() if callable(getattr(result, "summary", None)) else frame_summary(result)
    warning = getattr(result, "convergence_warning", None)
    advice = warning() if callable(warning) else None
    body = result._html_body() if callable(getattr(result, "_html_body", None)) else ranked_table(result.to_frame())
    meta = getattr(result, "meta", {}) or {}
    about = " / ".join(str(meta[k]) for k in ("model", "task") if meta.get(k) is not None)
    return result_html(type(result).__name__ + (f": {about}" if about else ""), summary=summary, advice=advice,
                       body=body)
