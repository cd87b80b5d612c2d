"""CHG scores, roles and their aggregation across seeds (small pure functions on tensors/frames).

Scores (paper Table 1): facilitation = G-, interference = 1 - G+, irrelevance = G+ * (1 - G-).

Role rule: a head's role is the score that is largest; ties go to facilitating, then interfering,
then irrelevant. The three scores are not a partition (a head with G+ = 0.5, G- = 0.5 scores 0.5,
0.5, 0.25), so read the scores themselves where roles are close.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

SCORES = ("facilitation", "interference", "irrelevance")
ROLES = {"facilitation": "facilitating", "interference": "interfering", "irrelevance": "irrelevant"}


def facilitation(g_minus: Tensor) -> Tensor:
    return g_minus


def interference(g_plus: Tensor) -> Tensor:
    return 1 - g_plus


def irrelevance(g_plus: Tensor, g_minus: Tensor) -> Tensor:
    return g_plus * (1 - g_minus)


def score_tensors(
    g_plus: Float[Tensor, "*seeds layer head"], g_minus: Float[Tensor, "*seeds layer head"]
) -> dict[str, Tensor]:
    """The three scores as tensors shaped like the gates."""
    return {
        "facilitation": facilitation(g_minus),
        "interference": interference(g_plus),
        "irrelevance": irrelevance(g_plus, g_minus),
    }


def roles(scores: dict[str, Tensor]) -> Tensor:
    """Index into :data:`SCORES` of each head's role (the largest score; ties in SCORES order).
    A NaN or infinite score is a ValueError: no role is assigned from it."""
    stacked = torch.stack([scores[s] for s in SCORES], dim=-1)
    if not bool(torch.isfinite(stacked).all()):
        n = int((~torch.isfinite(stacked)).any(dim=-1).sum())
        raise ValueError(f"{n} head(s) have non-finite gates or scores (NaN or inf): no role can be assigned; "
                         "the fit that produced them diverged, refit it")
    return stacked.argmax(dim=-1)  # argmax returns the first maximum: the documented tie order


def frame_roles(frame: pd.DataFrame, prefix: str = "") -> list[str]:
    """The role name of each row of a frame holding the three score columns (``prefix + score``),
    by the one rule of :func:`roles`.

    Example: ``per_head["role"] = taxonomy.frame_roles(per_head, prefix="mean_")``.
    """
    idx = roles({s: torch.tensor(frame[prefix + s].to_numpy(dtype="float64")) for s in SCORES})
    return [ROLES[SCORES[i]] for i in idx.tolist()]


def scores_frame(g_plus: Float[Tensor, "seeds layer head"], g_minus: Float[Tensor, "seeds layer head"]) -> pd.DataFrame:
    """Long frame: one row per (seed, layer, head) with G+, G-, the three scores and the role."""
    s = score_tensors(g_plus, g_minus)
    idx = torch.cartesian_prod(*(torch.arange(n) for n in g_plus.shape))
    role = roles(s).flatten()
    frame = pd.DataFrame({
        "seed": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "head": idx[:, 2].numpy(),
        "g_plus": g_plus.flatten().double().numpy(), "g_minus": g_minus.flatten().double().numpy(),
        **{k: v.flatten().double().numpy() for k, v in s.items()},
    })
    frame["role"] = [ROLES[SCORES[i]] for i in role.tolist()]
    return frame


def aggregate(scores: pd.DataFrame, by: tuple[str, ...] = ("layer", "head")) -> pd.DataFrame:
    """Per head: ``always_<score>`` (minimum over seeds) and ``any_<score>`` (maximum over seeds).

    Extra grouping columns (model, task, ...) present in ``scores`` can be added to ``by``.
    """
    grouped = scores.groupby(list(by), sort=True)[list(SCORES)]
    low = grouped.min().add_prefix("always_")
    high = grouped.max().add_prefix("any_")
    out = pd.concat([low, high], axis=1).reset_index()
    out["n_seeds"] = scores.groupby(list(by), sort=True).size().to_numpy()
    return out


def percent_above(scores: pd.DataFrame, threshold: float = 0.5, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """The paper's Table 2: percent of heads whose score is >= ``threshold`` in every seed
    ("always") or in at least one seed ("any"), for each score; grouped by ``by`` if given."""
    keys = ("layer", "head")
    agg = aggregate(scores, by=tuple(by) + keys)
    cols = {f"{mode}_{s}": (agg[f"{mode}_{s}"] >= threshold) for mode in ("always", "any") for s in SCORES}
    flags = pd.DataFrame(cols)
    for b in by:
        flags[b] = agg[b]
    if by:
        return (flags.groupby(list(by)).mean() * 100).reset_index()
    return (flags.mean() * 100).to_frame("percent").T.reset_index(drop=True)


def cross_model_consistency(scores: pd.DataFrame, n_grid: int = 101) -> pd.DataFrame:
    """The paper's cross-model consistency statistic (Section 4.2): for each task and score, the
    Pearson correlation between every pair of models' score distributions.

    Models have different numbers of heads, so each model's distribution (all its seeds and heads)
    is summarised by its empirical CDF on ``n_grid`` equally spaced thresholds in [0, 1] (what Fig.
    3a plots); ``pearson`` is the correlation of two models' CDF vectors. ``scores`` needs columns
    ``model, task`` and the three scores (``CHGResult.scores()`` of several fits, concatenated).
    Returns one row per (task, score, model_a, model_b) with ``pearson``; empty with one model.

    Example::

        frame = pd.concat([r.scores() for r in results])
        c = cross_model_consistency(frame)
        c.pearson.min(), c.pearson.mean()     # the paper: 0.949 and 0.992 over 54 pairs
    """
    missing = [c for c in ("model", "task", *SCORES) if c not in scores.columns]
    if missing:
        raise ValueError(f"cross_model_consistency needs columns model, task and {SCORES}; missing {missing}")
    if n_grid < 2:
        raise ValueError(f"n_grid must be at least 2; got {n_grid}")
    grid = torch.linspace(0, 1, n_grid, dtype=torch.float64)
    rows = []
    for task, part in scores.groupby("task", sort=True):
        names = list(dict.fromkeys(part["model"]))
        for score in SCORES:
            cdfs = {}
            for m in names:
                v = torch.tensor(part.loc[part["model"] == m, score].to_numpy(dtype="float64"))
                cdfs[m] = (v[None, :] <= grid[:, None]).double().mean(dim=1)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    pair = torch.stack([cdfs[a], cdfs[b]])
                    r = torch.corrcoef(pair)[0, 1].item()
                    rows.append({"task": task, "score": score, "model_a": a, "model_b": b, "pearson": r})
    return pd.DataFrame(rows, columns=["task", "score", "model_a", "model_b", "pearson"])
