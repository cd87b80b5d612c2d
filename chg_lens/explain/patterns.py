"""Pattern statistics: the standard attention patterns a head is scored against, where each has
a source, and how much of a head's attention each takes beyond chance.

The patterns are previous token, current token, first token (the BOS / attention-sink position,
the *resting state*), duplicate token, induction and tokens ``k`` back (``offset_k``). For each,
:func:`pattern_sources` gives the one source it predicts per query token and :func:`pattern_fits`
the head's attention mass on its sources, only at the query tokens where it has a source, against
chance (uniform attention over the ``q + 1`` visible positions). Used by the pattern explainer
(:mod:`chg_lens.explain.pattern_explainer`) and the LLM prompt (:mod:`chg_lens.explain.llm`).

Example::

    fits = pattern_fits(raw.tokens[w], raw.sources[i][w], raw.weights[i][w])
    fits["induction"]["excess"]             # mass on its sources - chance, where it applies
    pattern_sources(raw.tokens[w])["previous_token"]   # [W, T] source position per query (-1: none)
"""

from __future__ import annotations

import numpy as np

from .record import OFFSETS, pattern_counts

PATTERN_TEXT = {
    "previous_token": "attends from each token to the token just before it",
    "current_token": "attends from each token to itself",
    "first_token": "attends to the first token of the text (the BOS / attention-sink position)",
    "duplicate_token": "attends from a token to earlier occurrences of the same token",
    "induction": "attends from a token to the token that followed an earlier occurrence of the same token (induction)",
}
PATTERNS = tuple(PATTERN_TEXT) + tuple(f"offset_{k}" for k in OFFSETS)


def pattern_text(pattern: str) -> str:
    if pattern.startswith("offset_"):
        return f"attends from each token to the token {pattern.split('_')[1]} positions back"
    return PATTERN_TEXT[pattern]


def pattern_name(pattern: str) -> str:
    if pattern.startswith("offset_"):
        return f"{pattern.split('_')[1]}-back"
    return pattern.replace("_", " ")


# ----------------------------------------------------------------------------- patterns from tokens
def pattern_sources(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """For each pattern, the one source position it predicts per query token (``-1``: none), ``[W, T]``
    (duplicate and induction: the latest earlier occurrence). Used to predict activity."""
    W, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (W, T))
    out = {"previous_token": np.where(pos >= 1, pos - 1, -1),
           "current_token": np.where(pos >= 1, pos, -1),
           "first_token": np.where(pos >= 1, 0, -1)}
    for k in OFFSETS:
        out[f"offset_{k}"] = np.where(pos >= k, pos - k, -1)
    dup = np.full((W, T), -1)
    ind = np.full((W, T), -1)
    for w in range(W):
        last: dict[int, int] = {}
        before_last: dict[int, int] = {}
        for i in range(T):
            t = int(tokens[w, i])
            if t in last:
                dup[w, i] = last[t]
                j = last[t] if last[t] <= i - 2 else before_last.get(t, -1)
                ind[w, i] = j + 1 if j >= 0 else -1
                before_last[t] = last[t]
            last[t] = i
    out["duplicate_token"] = dup
    out["induction"] = ind
    return out


def _topk_masses(tokens: np.ndarray, sources: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Attention mass on each pattern's sources from the recorded top sources only (files written
    before the exact masses were recorded)."""
    W, T, k = sources.shape
    pos = np.arange(T)[None, :, None]
    tok_q = tokens[:, :, None]
    tok_s = np.take_along_axis(tokens, sources.reshape(W, T * k), 1).reshape(W, T, k)
    prev_s = np.take_along_axis(tokens, np.maximum(sources - 1, 0).reshape(W, T * k), 1).reshape(W, T, k)
    real = sources >= 1
    masks = {"previous_token": real & (sources == pos - 1), "current_token": real & (sources == pos),
             "first_token": (sources == 0) & (pos >= 1), "duplicate_token": real & (sources < pos) & (tok_s == tok_q),
             "induction": (sources >= 2) & (sources < pos) & (prev_s == tok_q)}
    for o in OFFSETS:
        masks[f"offset_{o}"] = real & (sources == pos - o)
    return {p: (weights * masks[p]).sum(-1) for p in PATTERNS}


def pattern_fits(tokens: np.ndarray, sources: np.ndarray, weights: np.ndarray,
                 masses: dict[str, np.ndarray] | None = None, min_coverage: float = 0.02
                 ) -> dict[str, dict[str, float]]:
    """Per pattern, over the query tokens where it has a source (position 0 never counts):

    - ``fit``: the mean attention mass on the pattern's sources (exact ``masses`` when recorded,
      else from the top recorded sources);
    - ``chance``: the mean of ``n_sources / (q + 1)``, what uniform attention would give;
    - ``excess``: ``fit - chance``, the evidence the label is chosen by;
    - ``coverage``: the share of query tokens (``q >= 1``) where the pattern applies;
    - ``rest``: the mean mass on the first token where the pattern does *not* apply (the resting state).

    For ``first_token`` the fit is the head's sink share over all ``q >= 1``. Induction is measured
    twice: wherever the current token occurred before, and in repeated phrases only (the current and
    the previous token occurred together before: :func:`~chg_lens.explain.record.repeated_phrase`),
    where a single earlier occurrence of a frequent token is no longer mistaken for a repeat; the
    entry keeps the one with the larger excess (``where``: "any" or "phrase", the phrase measure
    only with ``min_coverage``), and both under ``fit_any`` / ``fit_phrase`` etc.
    """
    W, T = tokens.shape
    counts = pattern_counts(tokens)
    mass = masses if masses is not None else _topk_masses(tokens, sources, weights)
    mass = {p: np.asarray(m, dtype=np.float64) for p, m in mass.items()}
    pos = np.arange(T)[None, :]
    later = np.broadcast_to(pos >= 1, (W, T))
    out = {}
    for name in PATTERNS:
        defined = counts[name] > 0
        n = int(defined.sum())
        chance = counts[name] / (pos + 1.0)
        fit = float(mass[name][defined].mean()) if n else 0.0
        ch = float(chance[defined].mean()) if n else 0.0
        off = later & ~defined
        rest = float(mass["first_token"][off].mean()) if off.any() else float("nan")
        out[name] = {"fit": fit, "chance": ch, "excess": fit - ch, "coverage": n / float(W * (T - 1)),
                     "rest": rest}
    ind = out["induction"]
    phrase = (counts["repeated_phrase"] > 0) & (counts["induction"] > 0)
    n = int(phrase.sum())
    chance = counts["induction"] / (pos + 1.0)
    fit_p = float(mass["induction"][phrase].mean()) if n else 0.0
    ch_p = float(chance[phrase].mean()) if n else 0.0
    extra = {"fit_any": ind["fit"], "chance_any": ind["chance"], "coverage_any": ind["coverage"],
             "fit_phrase": fit_p, "chance_phrase": ch_p, "coverage_phrase": n / float(W * (T - 1)), "where": "any"}
    if extra["coverage_phrase"] >= min_coverage and fit_p - ch_p > ind["excess"]:
        ind.update(fit=fit_p, chance=ch_p, excess=fit_p - ch_p, coverage=extra["coverage_phrase"])
        extra["where"] = "phrase"
    ind.update(extra)
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = a.std(), b.std()
    if sa < 1e-12 or sb < 1e-12:
        return float("nan")
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


__all__ = ["PATTERNS", "PATTERN_TEXT", "correlation", "pattern_fits", "pattern_name", "pattern_sources",
           "pattern_text"]
