"""Salient events: the (window, token) places where a head is most active, with their context.

Windows are split once into *explained* windows (events shown to an explainer) and *held-out*
windows (used only for scoring), so an explanation is never scored on the text it was made from.

Example::

    train, held_out = split_windows(raw.tokens.shape[0], holdout_fraction=0.5)
    ev = salient_events(raw, raw.head_index(0, 1), train, topk=20, n_random=20)
    ev[["kind", "activity", "context", "attended"]].head()
"""

from __future__ import annotations

import string

import numpy as np
import pandas as pd

from .probes import numpy_rng
from .record import RawActivity

TOKEN_CLASSES = ("start", "whitespace", "digit", "punctuation", "capitalized word", "word start",
                 "word piece", "other")


def split_windows(n_windows: int, holdout_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Indices of explained and held-out windows: the last ``holdout_fraction`` are held out
    (windows are already shuffled when sampled)."""
    if not 0 < holdout_fraction < 1:
        raise ValueError("holdout_fraction must be between 0 and 1")
    n_test = min(max(1, int(round(n_windows * holdout_fraction))), n_windows - 1)
    if n_windows < 2:
        raise ValueError("need at least 2 windows: some to explain from, some held out for scoring")
    idx = np.arange(n_windows)
    return idx[: n_windows - n_test], idx[n_windows - n_test:]


def token_class(text: str, is_bos: bool = False) -> str:
    """A coarse class for a token string, used by explanations: one of :data:`TOKEN_CLASSES`."""
    if is_bos:
        return "start"
    core = text.strip()
    if not core:
        return "whitespace"
    if core.isdigit():
        return "digit"
    if all(c in string.punctuation for c in core):
        return "punctuation"
    if core[0].isupper():
        return "capitalized word"
    if core.isalpha():
        return "word start" if text[:1].isspace() else "word piece"
    return "other"


def show(text: str) -> str:
    """A token string as it is shown in prompts and reports (newlines visible)."""
    return text.replace("\n", "\\n")


def context(tokens: np.ndarray, pos: int, token_str: dict[int, str], left: int = 12, right: int = 4) -> str:
    """The text around ``pos`` with the token itself marked ``[[like this]]``."""
    lo, hi = max(0, pos - left), min(len(tokens), pos + right + 1)
    parts = [show(token_str.get(int(t), "?")) for t in tokens[lo:hi]]
    parts[pos - lo] = "[[" + parts[pos - lo] + "]]"
    return ("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < len(tokens) else "")


def attended(raw: RawActivity, head_index: int, window: int, pos: int, min_weight: float = 0.05) -> str:
    """The tokens the head attends to most from ``pos``: ``'x'@3 (0.91), ...``."""
    out = []
    for s, w in zip(raw.sources[head_index, window, pos], raw.weights[head_index, window, pos]):
        if w >= min_weight:
            tok = show(raw.token_str.get(int(raw.tokens[window, s]), "?"))
            out.append(f"{tok!r}@{int(s)} ({float(w):.2f})")
    return ", ".join(out)


def salient_events(raw: RawActivity, head_index: int, windows: np.ndarray, topk: int = 200,
                   n_random: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The ``topk`` most active (window, token) events of one head within ``windows`` (kind "top"),
    plus ``n_random`` (default ``topk``) events drawn from its other at-or-below-median tokens (kind "random").

    Columns: kind, window, pos, token, activity, context, attended.
    """
    act = raw.activity[head_index][windows]                     # [w, T]
    flat = act.reshape(-1)
    k = min(topk, flat.size)
    top = np.argsort(-flat, kind="stable")[:k]
    low = np.setdiff1d(np.flatnonzero(flat <= np.median(flat)), top)
    n_random = k if n_random is None else n_random
    rng = numpy_rng(seed)
    rand = rng.choice(low, size=min(n_random, low.size), replace=False) if low.size else np.array([], dtype=int)
    rows = []
    T = act.shape[1]
    for kind, picks in (("top", top), ("random", np.sort(rand))):
        for f in picks:
            w, p = int(windows[f // T]), int(f % T)
            rows.append({"kind": kind, "window": w, "pos": p, "token": int(raw.tokens[w, p]),
                         "activity": float(raw.activity[head_index, w, p]),
                         "context": context(raw.tokens[w], p, raw.token_str),
                         "attended": attended(raw, head_index, w, p)})
    return pd.DataFrame(rows, columns=["kind", "window", "pos", "token", "activity", "context", "attended"])
