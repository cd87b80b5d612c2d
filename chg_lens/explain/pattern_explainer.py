"""The offline pattern explainer: a head's one-sentence explanation from its attention pattern and
output, and the hypothesis that predicts its activity from the tokens alone (no network).

:class:`PatternExplainer` scores the head against standard attention patterns (previous token,
current token, duplicate token, induction, tokens k back) by what they explain *beyond the resting
state*: for each pattern, the head's attention mass on the pattern's source positions, only at the
query tokens where the pattern has a source (induction and duplicate-token need an earlier
occurrence of the current token), minus the chance level there (uniform attention over the
``q + 1`` visible positions; :func:`~chg_lens.explain.patterns.pattern_fits`). Attention to the
first token (the BOS / attention-sink position) is reported separately as the head's *resting
state*, not as a competing pattern. The label is the pattern with the largest excess over chance; a
head with no pattern above ``min_excess`` that rests on the first token is a first-token
(attention-sink) head. A head that is mostly at rest but does induction whenever it can is
therefore an induction head ("... when the current token occurred before; otherwise it rests on the
first token").

The explainer then fits a small table of the head's mean output by token or token class (of the
attended or the current token); the sentence names only tokens whose mean output stands out
against the head's average (lift ``>= min_lift``, at least ``output_min_count`` occurrences and
``z >= min_z`` standard errors above the average), so tokens that are merely frequent (',' or
'<unk>' in WikiText) are not named, and says so when the output is not token-specific. Probe
scores (:mod:`chg_lens.explain.probes`) are quoted beside the label, never used to choose it (so
the probe agreement in ``scores.parquet`` is an independent check).

:func:`label_of` gives the pattern an explanation names (the hypothesis' pattern, or for free text
:func:`label_from_text`).

Example::

    ex = PatternExplainer()
    rec = ex.explain(raw, i, train_windows, events)       # {"layer", "head", "explanation", "hypothesis", ...}
    pred = ex.predict(rec, raw.tokens[held_out], raw.token_str)   # [windows, pos]
    label_of(rec)                                          # "induction", "previous_token", ..., or "none"
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from .events import show, token_class
from .patterns import PATTERNS, correlation, pattern_fits, pattern_name, pattern_sources, pattern_text
from .probes import PROBES, describe, probe_lookup
from .record import RawActivity

WHEN_TEXT = {  # the conditional form, for patterns that apply only at some tokens
    "duplicate_token": "it attends to the earlier occurrences of that token",
    "induction": "it attends to the token that followed the earlier occurrence",
}
HEAD_NAMES = {"previous_token": "Previous-token head", "current_token": "Current-token head",
              "first_token": "First-token (attention-sink) head", "duplicate_token": "Duplicate-token head",
              "induction": "Induction head"}


class PatternExplainer:
    """Offline explainer: the standard attention pattern with the most attention beyond chance, the
    resting state, the probe scores, and a table of the head's output.

    The hypothesis predicts a head's activity at each token from the tokens alone: the pattern
    gives the source position, and the table gives the mean output for that source's (or the
    current token's) token or token class.

    Thresholds: a pattern names the head when its ``excess`` (mass - chance, where it applies) is
    at least ``min_excess`` and it applies at ``min_coverage`` of the tokens; else a head with
    first-token share ``>= min_rest`` is a first-token (attention-sink) head. The output sentence
    names a token or class only with ``output_min_count`` occurrences, a mean output ``>= min_lift``
    times the head's average (over positions >= 1) and ``>= min_z`` standard errors above it.
    """

    name = "pattern"

    def __init__(self, min_count: int = 3, max_tokens: int = 40, min_coverage: float = 0.02,
                 min_excess: float = 0.2, min_rest: float = 0.5, min_lift: float = 1.5, min_z: float = 3.0,
                 output_min_count: int = 5, also_excess: float = 0.15):
        self.min_count, self.max_tokens = min_count, max_tokens
        self.min_coverage, self.min_excess, self.min_rest = min_coverage, min_excess, min_rest
        self.min_lift, self.min_z, self.output_min_count = min_lift, min_z, output_min_count
        self.also_excess = also_excess

    # -- fitting
    def choose(self, fits: dict[str, dict[str, float]]) -> tuple[str, str]:
        """``(pattern, kind)`` from :func:`pattern_fits`: kind "pattern" (a pattern above chance),
        "rest" (a first-token head) or "weak" (no pattern fits)."""
        usable = {p: f for p, f in fits.items() if p != "first_token" and f["coverage"] >= self.min_coverage}
        best = max(usable, key=lambda p: (usable[p]["excess"], -PATTERNS.index(p))) if usable else None
        if best is not None and usable[best]["excess"] >= self.min_excess:
            return best, "pattern"
        if fits["first_token"]["fit"] >= self.min_rest or best is None:
            return "first_token", "rest"
        return best, "weak"

    def explain(self, raw: RawActivity, head_index: int, windows: np.ndarray, events: pd.DataFrame | None = None
                ) -> dict[str, Any]:
        layer, head = raw.heads[head_index]
        tokens = raw.tokens[windows]
        act = raw.activity[head_index][windows].astype(np.float64)
        masses = {p: m[head_index][windows] for p, m in raw.masses.items()} if raw.masses is not None else None
        fits = pattern_fits(tokens, raw.sources[head_index][windows], raw.weights[head_index][windows], masses,
                            self.min_coverage)
        best, kind = self.choose(fits)
        probes = probe_lookup(raw.probes).get((layer, head))
        record = {"layer": layer, "head": head, "explainer": self.name, "status": "ok", "error": None}
        if act.std() < 1e-6 * max(1.0, abs(act.mean())):
            hyp = {"pattern": "inactive", "kind": "inactive", "fit": fits[best]["fit"], "fits": _round(fits),
                   "condition": "none", "table": {}, "default": float(act.mean()), "probes": probes}
            record.update(hypothesis=hyp, explanation=f"Writes a constant output ({act.mean():.3g}) on every token; "
                                                       f"it {pattern_text(best)} ({fits[best]['fit']:.0%} of its attention).")
            return record
        src = pattern_sources(tokens)[best]
        best_hyp, best_r = None, -np.inf
        for condition in ("source", "destination", "none"):
            hyp = self._table(tokens, src, act, condition, raw)
            hyp.update(pattern=best, kind=kind, fit=fits[best]["fit"], excess=round(fits[best]["excess"], 4),
                       fits=_round(fits), probes=probes)
            pred = self.predict({"hypothesis": hyp}, tokens, raw.token_str)
            r = correlation(pred.reshape(-1), act.reshape(-1))
            r = -1.0 if np.isnan(r) else r
            if r > best_r + 1e-9:
                best_hyp, best_r = hyp, r
        best_hyp["train_correlation"] = round(float(best_r), 4)
        record.update(hypothesis=best_hyp, explanation=self.sentence(best_hyp, raw.token_str))
        return record

    def _keys(self, tokens: np.ndarray, src: np.ndarray, condition: str, token_str: dict[int, str],
              bos: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: whether the pattern applies, and the token id / class that conditions the output."""
        W, T = tokens.shape
        applies = src >= 0
        if condition == "source":
            ref = np.where(applies, np.take_along_axis(tokens, np.maximum(src, 0), 1), -1)
        elif condition == "destination":
            ref = tokens.copy()
        else:
            ref = np.full((W, T), -1)
        pos0 = np.zeros((W, T), dtype=bool)
        pos0[:, 0] = True
        if condition == "source":
            is_start = np.where(applies, np.maximum(src, 0) == 0, False)
        else:
            is_start = pos0
        ids, inverse = np.unique(ref, return_inverse=True)
        names = np.array([token_class(token_str.get(int(t), ""), bos is not None and int(t) == bos) if t >= 0
                          else "" for t in ids], dtype=object)
        classes = names[inverse.reshape(ref.shape)]
        classes[is_start] = "start"
        return applies & ~pos0, ref, classes

    def _table(self, tokens, src, act, condition, raw) -> dict[str, Any]:
        bos = raw.meta.get("bos_token_id")
        applies, ref, classes = self._keys(tokens, src, condition, raw.token_str, bos)
        table: dict[str, float] = {}
        counts: dict[str, int] = {}
        pos0 = np.zeros_like(applies)
        pos0[:, 0] = True
        later = act[:, 1:]
        average, sd = float(later.mean()), float(later.std())
        if pos0.any():
            table["start"], counts["start"] = float(act[pos0].mean()), int(pos0.sum())
        off = ~applies & ~pos0
        if off.any():
            table["off"], counts["off"] = float(act[off].mean()), int(off.sum())
        if condition != "none":
            for cls in np.unique(classes[applies]):
                m = applies & (classes == cls)
                table[f"class:{cls}"], counts[f"class:{cls}"] = float(act[m].mean()), int(m.sum())
            ids, inv, n = np.unique(ref[applies], return_inverse=True, return_counts=True)
            sums = np.bincount(inv, weights=act[applies], minlength=len(ids))
            z = np.abs(sums / np.maximum(n, 1) - average) * np.sqrt(n)   # most informative tokens first
            keep = np.flatnonzero(n >= self.min_count)
            for j in keep[np.argsort(-z[keep], kind="stable")][: self.max_tokens]:
                table[f"tok:{int(ids[j])}"], counts[f"tok:{int(ids[j])}"] = float(sums[j] / n[j]), int(n[j])
        sd_on = 0.0
        if applies.any():
            table["on"], counts["on"] = float(act[applies].mean()), int(applies.sum())
            sd_on = float(act[applies].std())
        return {"condition": condition, "table": {k: round(v, 6) for k, v in table.items()},
                "counts": counts, "default": round(float(act.mean()), 6), "average": round(average, 6),
                "sd": round(sd, 6), "sd_on": round(sd_on, 6), "bos_token_id": bos}

    # -- prediction
    def predict(self, record: dict[str, Any], tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        """Predicted activity ``[W, T]`` from the hypothesis and the tokens alone."""
        hyp = record["hypothesis"]
        table, default = hyp["table"], hyp["default"]
        if hyp["pattern"] == "inactive":
            return np.full(tokens.shape, default, dtype=np.float64)
        src = pattern_sources(tokens)[hyp["pattern"]]
        applies, ref, classes = self._keys(tokens, src, hyp["condition"], token_str, hyp.get("bos_token_id"))
        on = table.get("on", default)
        ids, inv = np.unique(ref, return_inverse=True)
        by_token = np.array([table.get(f"tok:{int(t)}", np.nan) for t in ids])[inv.reshape(ref.shape)]
        names, cinv = np.unique(classes.astype(str), return_inverse=True)
        by_class = np.array([table.get(f"class:{c}", on) for c in names])[cinv.reshape(ref.shape)]
        out = np.where(applies, np.where(np.isnan(by_token), by_class, by_token), table.get("off", default))
        out[:, 0] = table.get("start", default)
        return out.astype(np.float64)

    # -- words
    def attention_text(self, hyp: dict[str, Any]) -> str:
        """The attention half of the sentence: label, evidence against chance, resting state, other patterns."""
        p, kind, fits = hyp["pattern"], hyp.get("kind", "pattern"), hyp["fits"]
        f, sink = fits[p], fits["first_token"]["fit"]
        if kind == "pattern" and p in WHEN_TEXT:
            when = ("when the current token occurred before in the same context (a repeated phrase)"
                    if f.get("where") == "phrase" else "when the current token occurred before")
            text = (f"{HEAD_NAMES[p]}: {when}, {WHEN_TEXT[p]} ({f['fit']:.0%} of its attention there, "
                    f"chance {f['chance']:.0%})")
            rest = f.get("rest", float("nan"))
            if rest == rest and rest >= 0.3:
                text += f"; otherwise it rests on the first token ({rest:.0%} of its attention)"
        elif kind == "pattern":
            text = (f"{HEAD_NAMES.get(p, 'Positional head')}: it {pattern_text(p)} ({f['fit']:.0%} of its attention, "
                    f"chance {f['chance']:.0%})")
            if sink >= 0.3:
                text += f"; the rest mostly on the first token ({sink:.0%}, its resting state)"
        else:
            usable = {q: g for q, g in fits.items() if q != "first_token" and g["coverage"] >= self.min_coverage}
            runner = max(usable, key=lambda q: usable[q]["excess"]) if usable else None
            p = runner or p                                  # not repeated under "also" below
            best = (f"best: {pattern_name(runner)}, {usable[runner]['fit']:.0%} of its attention where it applies, "
                    f"chance {usable[runner]['chance']:.0%}") if runner else "no pattern applies"
            if kind == "rest":
                text = (f"{HEAD_NAMES['first_token']}: it rests on the first token (the BOS / attention-sink position, "
                        f"{sink:.0%} of its attention); no pattern takes {self.min_excess:.0%} of its attention "
                        f"beyond chance ({best})")
            else:
                text = f"No standard attention pattern fits well ({best}; first token {sink:.0%})"
        others = [q for q, g in fits.items() if q not in (p, "first_token") and g["coverage"] >= self.min_coverage
                  and g["excess"] >= self.also_excess]
        others.sort(key=lambda q: -fits[q]["excess"])
        if others:
            text += "; also " + ", ".join(f"{pattern_name(q)} {fits[q]['fit']:.0%} (chance {fits[q]['chance']:.0%})"
                                          for q in others[:2])
        return text

    def probe_text(self, hyp: dict[str, Any]) -> str:
        """``"; on repeated random tokens its induction score is 0.85"`` (empty without probes)."""
        probes = hyp.get("probes")
        if not probes:
            return ""
        p = hyp["pattern"]
        named = [p] if p in PROBES else []
        named += [q for q in PROBES if q not in named and q != "first_token" and probes.get(q, 0.0) >= 0.3]
        if not named:
            return ""
        return "; probe scores on repeated random tokens: " + describe(probes, named)

    def output_text(self, hyp: dict[str, Any], token_str: dict[int, str]) -> str:
        """The output half: whether the output is larger where the pattern applies, and the tokens or
        classes that raise it well above its average there (the table's token means are taken where
        the pattern applies, so they are compared with the mean there, not with the mean over all tokens)."""
        table, counts = hyp["table"], hyp["counts"]
        parts = []
        on, off = table.get("on"), table.get("off")
        if on is not None and off is not None and counts.get("off", 0) >= self.output_min_count and min(on, off) > 0:
            ratio = max(on, off) / min(on, off)
            if ratio >= self.min_lift:
                where = "where the pattern applies" if on > off else "where the pattern does not apply"
                parts.append(f"its output is {ratio:.1f}x larger {where}")
        if hyp["condition"] == "none":
            return "; " + " and ".join(parts) if parts else "; its output is not token-specific"
        base = on if on is not None else hyp.get("average", hyp["default"])
        sd = hyp.get("sd_on", hyp.get("sd", 0.0))
        items = []
        for k, v in table.items():
            n = counts.get(k, 0)
            if not (k.startswith("tok:") or k.startswith("class:")) or k == "class:start" or n < self.output_min_count:
                continue
            lift = v / base if base > 0 else float("inf")
            z = (v - base) / (sd / np.sqrt(n)) if sd > 0 else 0.0
            if lift >= self.min_lift and z >= self.min_z:
                items.append((k, lift))
        items.sort(key=lambda kv: -kv[1])
        which = "attended token" if hyp["condition"] == "source" else "current token"
        there = " where the pattern applies" if off is not None else ""
        if not items:
            tail = (f"not token-specific (no {which} or token class raises it to {self.min_lift:g}x its "
                    f"average{there})")
        else:
            names = []
            for k, lift in items[:3]:
                what = repr(show(token_str.get(int(k[4:]), "?"))) if k.startswith("tok:") else f"a {k[6:]}"
                names.append(f"{what} ({lift:.1f}x)")
            tail = (f"largest, against its average{there}, when the {which} is " + ", ".join(names[:-1]) +
                    (" or " if len(names) > 1 else "") + names[-1])
        return "; " + (parts[0] + ", and " + tail if parts else "its output is " + tail)

    def sentence(self, hyp: dict[str, Any], token_str: dict[int, str], usable: Any = None) -> str:
        return self.attention_text(hyp) + self.probe_text(hyp) + self.output_text(hyp, token_str) + "."


def label_of(record: dict[str, Any]) -> str:
    """The pattern an explanation names: the hypothesis' pattern for the pattern explainer ("none"
    when no pattern fits), else read from the text (:func:`label_from_text`)."""
    hyp = record.get("hypothesis")
    if isinstance(hyp, dict) and "pattern" in hyp:
        if hyp.get("kind") == "weak":
            return "none"
        return str(hyp["pattern"])
    return label_from_text(record.get("explanation") or "")


_TEXT_LABELS = (("induction", r"induction|token (that )?(followed|after) (an |the )?(earlier|previous) occurrence"),
                ("duplicate_token", r"duplicate|earlier occurrences? of the same|same token earlier|repeated token"),
                ("previous_token", r"previous[- ]token|preceding token|token (just )?before|prior token"),
                ("current_token", r"current[- ]token head|attends (from each token )?to itself|self[- ]attention"),
                ("first_token", r"first[- ]token|\bbos\b|beginning[- ]of|start of the (text|sequence)|attention[- ]sink"))


def label_from_text(text: str) -> str:
    """The first standard pattern a free-text explanation names ("none" if it names none)."""
    low = text.lower()
    for label, pattern in _TEXT_LABELS:
        if re.search(pattern, low):
            return label
    m = re.search(r"(\d+) (tokens|positions) (back|before|earlier)", low)
    return f"offset_{m.group(1)}" if m else "none"


def _round(fits: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {p: {k: round(v, 4) if isinstance(v, float) else v for k, v in f.items()} for p, f in fits.items()}


__all__ = ["HEAD_NAMES", "WHEN_TEXT", "PatternExplainer", "label_from_text", "label_of"]
