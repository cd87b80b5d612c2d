"""Clean/corrupted pairs and per-head effects: what patching and attribution share.

A layer between the scoring engine and the analyses (it imports ``data``, ``scoring`` and the
``results`` protocol only), so :mod:`chg_lens.patching` and :mod:`chg_lens.attribution` use one
pair check, one position mask, one metric, one mediating rule and one effect table:

- :func:`check_pair`: clean and corrupted rows pair up (same count, lengths, target positions);
- :func:`position_mask`: where a patch (or an attribution) acts;
- :data:`METRICS`, :func:`resolve_metric`, :func:`metric_values`: the per-row metric;
- :data:`RULES`, :func:`label_mediating`: which heads mediate;
- :func:`effect_frame`: per-prompt effects ``[heads, rows]`` -> the table ``layer, head, effect,
  se, t, p, mediating``;
- :class:`HeadEffectResult`: the result both return (``PatchResult``, ``AttributionResult``).

Example::

    from chg_lens import pairs
    pairs.check_pair(clean, corrupted)
    metric = pairs.resolve_metric("auto", clean)           # "logit_diff" when clean has answers
    frame = pairs.effect_frame([(0, 1), (1, 2)], per_prompt)   # per_prompt [2, rows]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from . import checks
from .data import TaskDataset, first_target_position
from .results import FrameResult, check_tensor, require
from .scoring import RowScores

METRICS = ("logprob", "prob", "logit_diff")
"""Per-row metrics of a pair analysis: summed target log-prob, its exp, logit(correct) - logit(wrong)."""
RULES = ("std", "significance")
"""Mediating rules of :func:`label_mediating`."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def check_pair(clean: TaskDataset, corrupted: TaskDataset) -> None:
    """Raise ``ValueError`` unless clean and corrupted rows have the same count and token lengths
    and their targets at the same positions.

    Example: ``check_pair(*tasks.ioi_pairs(model, n_prompts=8))``.
    """
    for name, d in (("clean", clean), ("corrupted", corrupted)):
        if not isinstance(d, TaskDataset):
            raise TypeError(f"{name} must be a TaskDataset; got {type(d).__name__}")
    if len(clean) != len(corrupted):
        raise ValueError(f"clean has {len(clean)} rows but corrupted has {len(corrupted)}; pair them row by row")
    if not bool((clean.lengths == corrupted.lengths).all()):
        bad = int((clean.lengths != corrupted.lengths).nonzero()[0])
        raise ValueError(
            f"row {bad}: clean is {int(clean.lengths[bad])} tokens but corrupted is {int(corrupted.lengths[bad])}; "
            "patching needs clean and corrupted prompts of equal token length (use single-token substitutions)"
        )
    if not torch.equal(clean.loss_mask[:, : corrupted.tokens.shape[1]], corrupted.loss_mask[:, : clean.tokens.shape[1]]):
        raise ValueError("clean and corrupted rows must have their targets at the same positions")


def position_mask(data: TaskDataset, positions: Any = "all") -> Bool[Tensor, "rows pos"] | None:
    """Where patches act: ``"all"`` (None: every position), ``"last"`` (the position that predicts
    each row's first target, i.e. the prompt's last token), a list of token indices used for every
    row (negative = from the last prompt token back), or a bool mask ``[rows, pos]``.

    Example: ``position_mask(corrupted, [-1])`` equals ``position_mask(corrupted, "last")``.
    """
    if isinstance(positions, Tensor):
        if positions.dtype != torch.bool or tuple(positions.shape) != tuple(data.tokens.shape):
            raise ValueError(f"a positions mask must be bool and shaped like the tokens {tuple(data.tokens.shape)}")
        return positions
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    last = first_target_position(data.loss_mask)
    mask = torch.zeros_like(data.tokens, dtype=torch.bool)
    rows = torch.arange(len(data))
    if isinstance(positions, str) and positions == "last":
        mask[rows, last] = True
        return mask
    if isinstance(positions, str) or not hasattr(positions, "__iter__"):
        raise ValueError(f"positions must be 'all', 'last', a list of token indices or a bool mask; got {positions!r}")
    for p in positions:
        if isinstance(p, bool) or not float(p).is_integer():
            raise ValueError(f"positions must be whole token indices; got {p!r}")
        p = int(p)
        col = last + 1 + p if p < 0 else torch.full_like(last, p)
        if bool(((col < 0) | (col > last)).any()):
            raise ValueError(f"position {p} falls outside some row's prompt")
        mask[rows, col] = True
    return mask


def resolve_metric(metric: str, clean: TaskDataset, allowed: Sequence[str] = METRICS) -> str:
    """The metric a pair analysis scores: ``"auto"`` is ``"logit_diff"`` when ``clean.row_meta``
    has ``answers`` (``[[correct_id, wrong_id], ...]``), else ``"logprob"``; a name outside
    ``allowed``, or ``"logit_diff"`` without answers, is a ``ValueError``.

    Example: ``resolve_metric("auto", clean)`` -> ``"logit_diff"`` for IOI pairs.
    """
    answers = clean.row_meta.get("answers")
    if isinstance(metric, str) and metric == "auto":
        return "logit_diff" if answers is not None else "logprob"
    if not isinstance(metric, str) or metric not in allowed:
        raise ValueError(f"metric must be one of {tuple(allowed)} or 'auto'; got {metric!r}")
    if metric == "logit_diff" and answers is None:
        raise ValueError("metric 'logit_diff' needs clean.row_meta['answers'] = [[correct_id, wrong_id], ...]")
    return metric


def metric_values(scores: RowScores, metric: str) -> Float[Tensor, "configs rows"]:
    """The per-row metric of :class:`~chg_lens.scoring.RowScores` (differentiable where the scores
    are): ``"logprob"`` (summed target log-prob), ``"prob"`` (its exp), ``"logit_diff"`` (needs
    answer logits) or ``"accuracy"`` (1.0 where every target is the argmax, not differentiable).

    Example: ``metric_values(score_configs(model, data, configs), "prob").mean(1)``.
    """
    if metric == "logprob":
        return scores.logprob_sum
    if metric == "prob":
        return scores.logprob_sum.exp()
    if metric == "logit_diff":
        return scores.logit_diff
    if metric == "accuracy":
        return scores.correct.to(torch.float32)
    raise ValueError(f"metric must be one of {(*METRICS, 'accuracy')}; got {metric!r}")


# --------------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------------


def check_effect_options(mediating: str, n_std: float, alpha: float, batch_size: int) -> int:
    """The options every per-head effect analysis (patching, attribution) shares, checked before any
    pass: the mediating rule, ``n_std`` (finite, >= 0), ``alpha`` (in (0, 1]) and ``batch_size``
    (a positive int, returned)."""
    if mediating not in RULES:
        raise ValueError(f"mediating rule must be one of {RULES}; got {mediating!r}")
    checks.finite_float("n_std", n_std, min=0)
    checks.finite_float("alpha", alpha, min=0, max=1, min_open=True)
    return checks.positive_int("batch_size", batch_size)


def effect_heads(heads: Sequence[tuple[int, int]] | None, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``heads`` (default: every head, layer by layer) as ``(layer, head)`` pairs, each inside the
    model and named once; a ValueError otherwise."""
    out = [(l, h) for l in range(n_layers) for h in range(n_heads)] if heads is None else \
        [(int(l), int(h)) for l, h in heads]
    if not out:
        raise ValueError("no heads given")
    bad = [(l, h) for l, h in out if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(f"heads {bad[:5]} are outside the model's {n_layers} layers x {n_heads} heads")
    if len(set(out)) != len(out):
        raise ValueError("heads names a head more than once")
    return out


def label_mediating(
    effect: Tensor, se: Tensor, n: int, rule: str = "std", n_std: float = 3.0, alpha: float = 0.05
) -> tuple[Tensor, Tensor, Tensor]:
    """(mediating, t, p) per head. ``"std"``: AIE above the mean over heads plus ``n_std`` standard
    deviations (Todd et al.); ``"significance"``: one-sided one-sample t-test of the per-prompt
    effects > 0, Bonferroni-corrected over heads (p < alpha / n_heads).

    Example: ``label_mediating(effect, se, n_rows, "significance", alpha=0.05)``.
    """
    from scipy import stats

    if rule not in RULES:
        raise ValueError(f"mediating rule must be one of {RULES}; got {rule!r}")
    t = effect / se.clamp_min(1e-12)
    p = torch.as_tensor(stats.t.sf(t.double().numpy(), df=max(n - 1, 1)), dtype=torch.float64)
    if rule == "std":
        spread = effect.std() if len(effect) > 1 else torch.tensor(float("nan"))  # one head: none mediates
        mediating = effect > effect.mean() + n_std * spread
    else:
        mediating = p < alpha / max(len(effect), 1)
    return mediating, t, p


def effect_frame(
    heads: Sequence[tuple[int, int]],
    per_prompt: Float[Tensor, "heads rows"],
    rule: str = "std",
    n_std: float = 3.0,
    alpha: float = 0.05,
    *,
    sign: int = 1,
) -> pd.DataFrame:
    """The per-head table of a pair analysis: ``layer, head, effect`` (mean over rows of
    ``per_prompt``), ``se`` (its standard error), ``t = effect / se``, ``p`` and ``mediating``
    (:func:`label_mediating`). ``sign=-1`` applies the rule and the one-sided test to ``-effect``
    (for effects where a negative value means the head matters, e.g. the attribution of an
    ablation); ``t`` keeps the sign of ``effect``.

    Example::

        frame = effect_frame([(0, 0), (0, 1)], torch.randn(2, 16), "significance")
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1; got {sign!r}")
    per_prompt = per_prompt.detach().float().cpu()
    if per_prompt.ndim != 2 or per_prompt.shape[0] != len(heads):
        raise ValueError(f"per_prompt must be [n_heads={len(heads)}, rows]; got {tuple(per_prompt.shape)}")
    n = per_prompt.shape[1]
    effect = per_prompt.mean(dim=1)
    se = per_prompt.std(dim=1) / math.sqrt(n) if n > 1 else torch.zeros_like(effect)
    med, t, p = label_mediating(sign * effect, se, n, rule, n_std, alpha)
    return pd.DataFrame({"layer": [int(l) for l, _ in heads], "head": [int(h) for _, h in heads],
                         "effect": effect.double().numpy(), "se": se.double().numpy(),
                         "t": (sign * t).double().numpy(), "p": p.numpy(), "mediating": med.numpy().astype(bool)})


@dataclass
class HeadEffectResult(FrameResult):
    """Per head: ``frame`` (``layer, head, effect``, ``se``, ``t``, ``p``, ``mediating``),
    ``per_prompt`` effects ``[n_heads_scored, rows]``, the baselines and ``meta``. The common base
    of :class:`chg_lens.patching.PatchResult` (kind "patching") and
    :class:`chg_lens.attribution.AttributionResult` (kind "attribution"), so the two are
    interchangeable wherever a per-head effect is read."""

    kind = ""
    noun = "a per-head effect result"
    frame: pd.DataFrame
    per_prompt: Float[Tensor, "heads rows"]
    baseline: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, column: str = "effect") -> Float[Tensor, "layer head"]:
        """``column`` as ``[n_layers, n_heads]`` (NaN for heads not scored)."""
        return super().tensor(column)

    @property
    def effects(self) -> Float[Tensor, "layer head"]:
        """The mean effect as an ``[n_layers, n_heads]`` tensor."""
        return self.tensor("effect")

    def mediating_heads(self) -> list[tuple[int, int]]:
        """The mediating heads, largest effect first."""
        f = self.frame[self.frame["mediating"]].sort_values("effect", ascending=False)
        return list(zip(f["layer"].astype(int), f["head"].astype(int)))

    def tensors_to_save(self) -> dict[str, Tensor]:
        return {"per_prompt": self.per_prompt, "effects": self.effects}

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        require(tensors, ["per_prompt"], path, cls.noun.split(" ", 1)[-1])
        frame, baseline, inner = cls._checked_fields(tensors, meta, path)
        check_tensor(tensors, "per_prompt", (len(frame), None), path)
        if "mediating" not in frame.columns:
            raise ValueError(f"{path}: the table has no 'mediating' column: not a complete {cls.noun.split(' ', 1)[-1]}")
        frame["mediating"] = frame["mediating"].astype(bool)
        return cls(frame, tensors["per_prompt"], baseline, inner)
