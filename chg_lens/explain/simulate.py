"""Score explanations by simulation on held-out windows.

The explainer predicts each held-out token's activity from the explanation alone; the
*simulation score* is the Pearson correlation between predicted and real activity over all
tokens of the simulated windows, and the *detection score* is the balanced accuracy of telling
the ``topk`` most active tokens from as many at-or-below-median ones, thresholding the prediction at
its median over those events (a constant prediction scores 0.5).

With probe scores recorded (``probes.parquet``), each row also says whether the label predicts the
probe: ``label`` (the pattern the explanation names, :func:`~chg_lens.explain.explainers.label_of`),
``probe_score`` (the head's probe score for that pattern; NaN when the pattern has no probe) and
``probe_percentile`` (the share of the other recorded heads whose score on that probe is lower: 1.0
means no other head scores higher). :func:`probe_agreement` summarises this per label: the mean
probe score of the heads with the label against the others, and the AUROC of the probe score for
telling them apart (0.5: the label says nothing about the probe).

Example::

    row = score_head(PatternExplainer(), record, raw, raw.head_index(1, 0), held_out)
    row["simulation_score"], row["detection_score"]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .explainers import LLMError, correlation, label_of
from .probes import PROBES, numpy_rng, probe_lookup
from .record import RawActivity

SCORE_COLUMNS = ["layer", "head", "explainer", "status", "simulation_score", "detection_score",
                 "n_windows", "n_tokens", "error", "label", "probe_score", "probe_percentile"]


def detection_score(pred: np.ndarray, real: np.ndarray, topk: int = 50, seed: int = 0) -> float:
    """Balanced accuracy at telling the ``topk`` most active tokens from ``topk`` at-or-below-median ones."""
    pred, real = np.asarray(pred, np.float64).reshape(-1), np.asarray(real, np.float64).reshape(-1)
    k = min(topk, real.size // 2)
    if k < 1 or real.std() < 1e-12:
        return float("nan")
    top = np.argsort(-real, kind="stable")[:k]
    low = np.setdiff1d(np.flatnonzero(real <= np.median(real)), top)
    if low.size == 0:
        return float("nan")
    neg = numpy_rng(seed).choice(low, size=min(k, low.size), replace=False)
    threshold = np.median(np.concatenate([pred[top], pred[neg]]))
    tpr = float((pred[top] > threshold).mean())
    tnr = float((pred[neg] <= threshold).mean())
    return 0.5 * (tpr + tnr)


def simulation_windows(raw: RawActivity, head_index: int, held_out: np.ndarray, limit: int | None, seed: int = 0
                       ) -> np.ndarray:
    """All held-out windows, or at most ``limit``: half the most active ones, half at random."""
    if limit is None or limit >= len(held_out):
        return held_out
    peak = raw.activity[head_index][held_out].max(axis=1)
    top = held_out[np.argsort(-peak, kind="stable")[: (limit + 1) // 2]]
    rest = np.setdiff1d(held_out, top)
    pick = numpy_rng(seed).choice(rest, size=min(limit - len(top), rest.size), replace=False)
    return np.sort(np.concatenate([top, pick]))


def score_head(explainer, record: dict[str, Any], raw: RawActivity, head_index: int, held_out: np.ndarray,
               topk: int = 50, seed: int = 0) -> dict[str, Any]:
    """One row of ``scores.parquet`` for one head's explanation (``record``)."""
    layer, head = raw.heads[head_index]
    row = {"layer": layer, "head": head, "explainer": record.get("explainer", explainer.name),
           "status": record.get("status", "ok"), "simulation_score": float("nan"),
           "detection_score": float("nan"), "n_windows": 0, "n_tokens": 0, "error": record.get("error")}
    if record.get("status") != "ok":
        return row
    limit = getattr(explainer, "sim_windows", None)
    windows = simulation_windows(raw, head_index, held_out, limit, seed)
    try:
        pred = explainer.predict(record, raw.tokens[windows], raw.token_str)
    except Exception as err:  # e.g. the simulator model failed after its retries: recorded, not fatal
        msg = str(err) if isinstance(err, LLMError) else f"{type(err).__name__}: {err}"
        scrub = getattr(explainer, "scrub", None)
        row.update(status="failed", error=scrub(msg) if scrub else msg)
        return row
    real = raw.activity[head_index][windows]
    row.update(simulation_score=correlation(pred.reshape(-1), real.reshape(-1)),
               detection_score=detection_score(pred, real, topk, seed),
               n_windows=int(len(windows)), n_tokens=int(real.size))
    return row


def score_all(explainer, records: list[dict[str, Any]], raw: RawActivity, held_out: np.ndarray, topk: int = 50,
              seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Score every explanation; failures are rows with NaN scores and the error, never an exception."""
    rows = []
    for rec in tqdm(records, desc="simulate", disable=not progress):
        i = raw.head_index(rec["layer"], rec["head"])
        rows.append(score_head(explainer, rec, raw, i, held_out, topk, seed))
    add_probe_columns(rows, records, probe_lookup(raw.probes))
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return frame.astype({"layer": "int64", "head": "int64", "n_windows": "int64", "n_tokens": "int64",
                         "simulation_score": "float64", "detection_score": "float64", "probe_score": "float64",
                         "probe_percentile": "float64"})


def add_probe_columns(rows: list[dict[str, Any]], records: list[dict[str, Any]],
                      probes: dict[tuple[int, int], dict[str, float]]) -> None:
    """Fill ``label``, ``probe_score`` and ``probe_percentile`` of each row (in place)."""
    for row, rec in zip(rows, records):
        label = label_of(rec) if rec.get("status") == "ok" else "failed"
        mine = probes.get((row["layer"], row["head"]))
        row["label"], row["probe_score"], row["probe_percentile"] = label, float("nan"), float("nan")
        if mine is None or label not in PROBES:
            continue
        others = [v[label] for k, v in probes.items() if k != (row["layer"], row["head"])]
        row["probe_score"] = mine[label]
        if others:
            row["probe_percentile"] = float(np.mean(np.asarray(others) < mine[label]))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half); NaN if a side is empty."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if positive.size == 0 or negative.size == 0:
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def probe_agreement(scores: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """Per label that has a probe: how many heads carry it, their mean probe score for it against the
    other explained heads', and the AUROC of that probe score for telling the two groups apart.

        probe_agreement(scores, raw.probes)   # label, n_heads, mean_probe, mean_probe_others, auroc
    """
    cols = ["label", "n_heads", "mean_probe", "mean_probe_others", "auroc"]
    if probes is None or not len(scores) or "label" not in scores:
        return pd.DataFrame(columns=cols)
    joined = scores[scores.status == "ok"][["layer", "head", "label"]].merge(probes, on=["layer", "head"])
    rows = []
    for label in PROBES:
        mine = joined.label == label
        if not mine.any():
            continue
        pos, neg = joined.loc[mine, label].to_numpy(), joined.loc[~mine, label].to_numpy()
        rows.append({"label": label, "n_heads": int(mine.sum()), "mean_probe": float(pos.mean()),
                     "mean_probe_others": float(neg.mean()) if neg.size else float("nan"), "auroc": auroc(pos, neg)})
    return pd.DataFrame(rows, columns=cols)
