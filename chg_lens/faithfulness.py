"""Faithfulness curves: how much of the model's behaviour the top-k heads of a ranking keep.

For each ranking (a CHG fit, a patching or attribution result, a score tensor, or random orders)
and each circuit size ``k``, keep the ``k`` highest-ranked heads (gate 1) and ablate every other
head (gate 0 with the ablation's source: zero, the mean ``z``, or a corrupted run's ``z``), and
score the data. Following MIB (Mueller et al., "MIB: A Mechanistic Interpretability Benchmark",
ICML 2025, arXiv:2504.13151), the faithfulness of the top-k circuit ``C_k`` is::

    f(k) = (m(C_k) - m(none kept)) / (m(all kept) - m(none kept))

so ``f(0) = 0`` and ``f(n) = 1`` (n = all heads), and a ranking is summarised by two areas over
the fraction of heads kept ``x = k / n`` in [0, 1] (trapezoid rule over the grid of ``k``):

- **CPR** (circuit performance ratio; higher is better): ``integral of f(x) dx``;
- **CMD** (circuit-model difference; lower is better): ``integral of |1 - f(x)| dx``.

MIB defines them over edges at the sizes {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100} % of the
graph; here the components are heads, and the default grid (:func:`default_grid`) is every ``k``
up to 16 and then every 1/32 of the heads, with ``k = 0`` and ``k = n`` always in it. Every
(method, k) configuration runs batched through :func:`chg_lens.scoring.score_configs`.

The package exports the function under the module's name: ``chg_lens.faithfulness`` is this
module and, called, :func:`faithfulness` (``chg_lens.faithfulness(model, data, rankings)``).
An ablation sweep ranks by its drop: pass ``-sweep.tensor("delta_logprob")``.

Example::

    from chg_lens.faithfulness import faithfulness
    res = faithfulness(model, val, {"chg": chg_result, "atp": attribution_result, "random": None})
    res.frame            # method, k, fraction, metric, normalized
    res.cpr(), res.cmd() # one number per method
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import checks, models
from .data import TaskDataset
from .pairs import METRICS, check_pair, metric_values, resolve_metric
from .results import FrameResult, frame_from_json, library_versions
from .scoring import collect_z, score_configs

FAITHFULNESS_METRICS = (*METRICS, "accuracy")
"""``metric=`` of :func:`faithfulness`: the pair metrics and accuracy (every target argmax-correct)."""
ABLATIONS = ("zero", "mean")
"""String ``ablation=`` values; a corrupted :class:`~chg_lens.data.TaskDataset` is the third kind."""
EFFECT_KINDS = ("patching", "attribution")
"""Result kinds ranked by ``|effect|``."""


# --------------------------------------------------------------------------------------------
# Rankings
# --------------------------------------------------------------------------------------------


def _describe(ranking: Any) -> str:
    return getattr(ranking, "kind", None) or type(ranking).__name__


def _chg_column(result: Any, column: str) -> Tensor:
    """A CHG result's column per head: one of ``result.aggregate()`` (``always_*``, ``any_*``) or a
    numeric column of ``result.scores()`` averaged over seeds."""
    agg = result.aggregate()
    agg_cols = [c for c in agg.columns if c not in ("layer", "head", "n_seeds")]
    scores = result.scores()
    score_cols = [c for c in scores.columns if c not in ("model", "task", "seed", "layer", "head", "role")
                  and pd.api.types.is_numeric_dtype(scores[c])]
    if column in agg_cols:
        frame = agg
    elif column in score_cols:
        frame = scores.groupby(["layer", "head"], as_index=False)[column].mean()
    else:
        raise ValueError(f"unknown CHG column {column!r}; pick one of result.aggregate()'s {agg_cols} or "
                         f"result.scores()'s {score_cols} (averaged over seeds)")
    L, H = int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1
    out = torch.full((L, H), float("nan"), dtype=torch.float64)
    out[torch.tensor(frame["layer"].to_numpy(dtype="int64")), torch.tensor(frame["head"].to_numpy(dtype="int64"))] = \
        torch.tensor(frame[column].to_numpy(dtype="float64"))
    return out


def head_scores(ranking: Any, n_layers: int, n_heads: int) -> Float[Tensor, "layer head"]:
    """How a ranking becomes one score per head (higher = more important), ``[n_layers, n_heads]``
    float64:

    - a CHG result (kind "chg"): its facilitation, mean over seeds;
    - ``(chg_result, column)``: a column of ``chg_result.aggregate()`` (e.g. ``"any_facilitation"``)
      or a score of ``chg_result.scores()`` (e.g. ``"g_plus"``) averaged over seeds;
    - a patching or attribution result: ``|effect|`` (every head must have been scored);
    - a tensor or array ``[n_layers, n_heads]``.

    A wrong shape, NaN/inf, an unknown column or an unknown type is a ``ValueError`` /
    ``TypeError``. ``None`` (random orders) has no scores: :func:`faithfulness` draws its orders.

    Example::

        head_scores((chg_result, "any_facilitation"), 30, 9).shape    # (30, 9)
    """
    if ranking is None:
        raise ValueError("a None ranking means random orders, which have no scores (faithfulness draws them)")
    if isinstance(ranking, tuple):
        if len(ranking) != 2 or getattr(ranking[0], "kind", None) != "chg" or not isinstance(ranking[1], str):
            raise TypeError("a tuple ranking is (CHGResult, column name), e.g. (result, 'any_facilitation'); got "
                            f"({', '.join(_describe(r) for r in ranking)})")
        scores = _chg_column(*ranking)
    elif getattr(ranking, "kind", None) == "chg":
        scores = _chg_column(ranking, "facilitation")
    elif getattr(ranking, "kind", None) in EFFECT_KINDS:
        scores = ranking.effects.double().abs()
        if bool(scores.isnan().any()) and tuple(scores.shape) == (n_layers, n_heads):
            missing = int(scores.isnan().sum())
            raise ValueError(f"the {ranking.kind} result has no effect for {missing} of {scores.numel()} heads; "
                             "rank with a result that scored every head (heads=None)")
    elif isinstance(ranking, (Tensor, np.ndarray)):
        scores = torch.as_tensor(ranking).detach().cpu()
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"a score tensor must hold real numbers; got {scores.dtype}")
        scores = scores.double()
    elif isinstance(ranking, str):
        raise ValueError(f"unknown ranking {ranking!r}: a ranking is a CHGResult, (CHGResult, column), a patching "
                         "or attribution result, an [n_layers, n_heads] tensor, or None (random)")
    else:
        raise TypeError(f"cannot rank heads by a {type(ranking).__name__}: pass a CHGResult, (CHGResult, column), "
                        "a patching or attribution result, an [n_layers, n_heads] tensor, or None (random)")
    if tuple(scores.shape) != (int(n_layers), int(n_heads)):
        raise ValueError(f"the ranking scores [{', '.join(map(str, scores.shape))}] heads but the model has "
                         f"[{n_layers}, {n_heads}] (n_layers, n_heads)")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"the ranking has {int((~torch.isfinite(scores)).sum())} NaN or infinite scores; "
                         "every head needs a finite score")
    return scores


def head_order(scores: Float[Tensor, "layer head"]) -> Int[Tensor, "heads"]:
    """Flat head indices (``layer * n_heads + head``) from the highest score down; ties keep
    (layer, head) order (a stable sort)."""
    return torch.sort(scores.flatten(), descending=True, stable=True).indices


def default_grid(n_total: int) -> list[int]:
    """The default circuit sizes for ``n_total`` heads: every ``k`` from 0 to 16, then every 1/32
    of the heads (rounded), and ``n_total``: every size for models of up to 32 heads.

    Example: ``default_grid(270)[:3], default_grid(270)[-3:]`` -> ``[0, 1, 2] [253, 262, 270]``.
    """
    n_total = checks.positive_int("n_total", n_total)
    small = range(0, min(n_total, 16) + 1)
    even = (round(n_total * i / 32) for i in range(33))
    return sorted({*small, *even, n_total})


def _grid(n_heads: Sequence[int] | None, n_total: int) -> list[int]:
    if n_heads is None:
        return default_grid(n_total)
    if isinstance(n_heads, (str, bytes)) or not hasattr(n_heads, "__iter__"):
        raise ValueError(f"n_heads must be a list of circuit sizes (numbers of heads kept); got {n_heads!r}")
    ks = [checks.whole_int("n_heads", k, min=0) for k in n_heads]
    bad = [k for k in ks if k > n_total]
    if bad:
        raise ValueError(f"n_heads {bad[:5]} exceed the model's {n_total} heads")
    return sorted({0, *ks, n_total})


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


def _area(x: np.ndarray, y: np.ndarray) -> float:
    """The trapezoid area under ``y(x)`` (``x`` ascending)."""
    if len(x) < 2:
        return float("nan")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


@dataclass
class FaithfulnessResult(FrameResult):
    """The result of :func:`faithfulness`: ``frame`` (one row per method and ``k``: ``method, k,
    fraction, metric, normalized``; a random method is the mean over its orders), ``baseline``
    (``{"all": m(all kept), "none": m(none kept)}``), ``meta`` and ``scores`` (each ranked method's
    head scores ``[n_layers, n_heads]``; random methods have none). :meth:`cpr` and :meth:`cmd`
    give MIB's areas, one number per method.

    Example::

        res.cpr().sort_values(ascending=False)     # best ranking first
        res.frame.pivot(index="k", columns="method", values="normalized")
    """

    kind = "faithfulness"
    noun = "a faithfulness result"
    IDENTITY = FrameResult.IDENTITY + ("ablation", "grid", "n_random", "methods", "task")
    frame: pd.DataFrame
    baseline: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)

    def _areas(self, value) -> pd.Series:
        out = {}
        for method, part in self.frame.groupby("method", sort=False):
            part = part.sort_values("fraction")
            out[method] = _area(part["fraction"].to_numpy(dtype="float64"), value(part["normalized"].to_numpy(dtype="float64")))
        return pd.Series(out, dtype="float64")

    def cpr(self) -> pd.Series:
        """CPR per method: the area under the normalized faithfulness ``f`` over the fraction of
        heads kept in [0, 1] (trapezoid rule; higher is better; MIB, Mueller et al. 2025)."""
        return self._areas(lambda f: f).rename("cpr")

    def cmd(self) -> pd.Series:
        """CMD per method: the area under ``|1 - f|`` over the fraction of heads kept in [0, 1]
        (trapezoid rule; lower is better; MIB, Mueller et al. 2025)."""
        return self._areas(lambda f: np.abs(1.0 - f)).rename("cmd")

    def tensor(self, column: str = "normalized") -> Tensor:
        raise ValueError("a faithfulness result has one row per (method, k), not per head; read .frame, or "
                         ".scores[method] for a method's head scores")

    def tensors_to_save(self) -> dict[str, Tensor]:
        return {f"scores/{name}": t for name, t in self.scores.items()}

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        scores = {k[len("scores/"):]: v for k, v in tensors.items() if k.startswith("scores/")}
        return cls(frame=frame_from_json(meta["frame"]), baseline=meta["baseline"], meta=meta["meta"], scores=scores)


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------


def _ablation_sources(model, data: TaskDataset, ablation: Any, reference: TaskDataset | None, batch_size: int):
    if isinstance(ablation, TaskDataset):
        return collect_z(model, ablation, mean=False, batch_size=batch_size)
    if ablation == "mean":
        return collect_z(model, reference if reference is not None else data, mean=True, batch_size=batch_size)
    return None


def _check_ablation(ablation: Any, data: TaskDataset, reference: TaskDataset | None) -> str:
    if isinstance(ablation, TaskDataset):
        check_pair(data, ablation)
        if reference is not None:
            raise ValueError("reference is the data of the mean z (ablation='mean'); a corrupted ablation "
                             "patches in its own z")
        return f"corrupted:{ablation.name}"
    if not isinstance(ablation, str) or ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} or a corrupted TaskDataset paired with the data; "
                         f"got {ablation!r}")
    if reference is not None and ablation != "mean":
        raise ValueError(f"reference is the data of the mean z (ablation='mean'); ablation is {ablation!r}")
    return ablation


def faithfulness(
    model,
    data: TaskDataset,
    rankings: Mapping[str, Any],
    *,
    ablation: str | TaskDataset = "mean",
    reference: TaskDataset | None = None,
    n_heads: Sequence[int] | None = None,
    metric: str = "logprob",
    n_random: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "off",
) -> FaithfulnessResult:
    """Faithfulness curves of head rankings: keep each ranking's top-k heads, ablate the rest.

    ``rankings`` maps a method name to a ranking (see :func:`head_scores`): a CHG result (mean
    facilitation), ``(chg_result, "any_facilitation")``, a patching or attribution result
    (``|effect|``), an ``[n_layers, n_heads]`` tensor (higher = more important), or None (``n_random``
    random orders drawn from ``seed``, averaged). Ties keep (layer, head) order.

    - ``ablation``: ``"zero"``, ``"mean"`` (mean ``z`` over ``reference``, default ``data``), or a
      corrupted :class:`~chg_lens.data.TaskDataset` paired row by row with ``data`` whose ``z`` is
      patched into the ablated heads.
    - ``n_heads``: the grid of circuit sizes ``k`` (default :func:`default_grid`); 0 and all heads
      are always added.
    - ``metric``: ``"logprob"`` (summed target log-prob), ``"prob"``, ``"logit_diff"`` (needs
      ``data.row_meta["answers"]``) or ``"accuracy"``; ``m`` is its mean over rows.

    ``normalized`` is ``f(k) = (m(top-k) - m(none kept)) / (m(all kept) - m(none kept))``;
    ``result.cpr()`` and ``result.cmd()`` are MIB's areas over the fraction of heads kept (Mueller et
    al., ICML 2025). Every (method, k) configuration, k = 0 and all heads included, runs batched
    through :func:`chg_lens.scoring.score_configs` (``batch_size`` rows, ``rows_per_pass`` rows of
    configurations x prompts per pass, ``autocast`` default ``"off"``: exact in the model's dtype).

    Example::

        res = faithfulness(model, val, {"chg": chg_result, "patching": patch_result, "random": None},
                           ablation="mean", reference=train)
        res.cpr(), res.cmd()
    """
    model = models.as_model(model)
    if not isinstance(data, TaskDataset):
        raise TypeError(f"data must be a TaskDataset; got {type(data).__name__}")
    if not isinstance(rankings, Mapping) or not rankings:
        raise ValueError("rankings must be a non-empty mapping of method name -> ranking, e.g. {'chg': result}")
    bad_names = [n for n in rankings if not isinstance(n, str) or not n or "/" in n]
    if bad_names:
        raise ValueError(f"method names must be non-empty strings without '/'; got {bad_names[:3]}")
    label = _check_ablation(ablation, data, reference)
    if reference is not None and not isinstance(reference, TaskDataset):
        raise TypeError(f"reference must be a TaskDataset; got {type(reference).__name__}")
    metric = resolve_metric(metric, data, FAITHFULNESS_METRICS)
    n_random = checks.positive_int("n_random", n_random)
    seed = checks.whole_int("seed", seed)
    batch_size = checks.positive_int("batch_size", batch_size)
    rows_per_pass = checks.positive_int("rows_per_pass", rows_per_pass)
    autocast = models.resolve_autocast(model, autocast)
    L, H = models.n_layers(model), models.n_heads(model)
    N = L * H
    grid = _grid(n_heads, N)
    scores = {name: head_scores(r, L, H) for name, r in rankings.items() if r is not None}
    for d in (data, reference, ablation if isinstance(ablation, TaskDataset) else None):
        if d is not None:
            d.check_model(model)

    gen = torch.Generator().manual_seed(seed)
    orders: dict[str, list[Tensor]] = {}
    for name, r in rankings.items():
        orders[name] = [head_order(scores[name])] if r is not None else [torch.randperm(N, generator=gen)
                                                                          for _ in range(n_random)]
    inner = [k for k in grid if 0 < k < N]
    configs = [torch.ones(L, H), torch.zeros(L, H)]
    for name in rankings:
        for order in orders[name]:
            for k in inner:
                g = torch.zeros(N)
                g[order[:k]] = 1.0
                configs.append(g.reshape(L, H))
    sources = _ablation_sources(model, data, ablation, reference, batch_size)
    answers = data.row_meta.get("answers") if metric == "logit_diff" else None
    out = score_configs(model, data, torch.stack(configs), sources, answers=answers, batch_size=batch_size,
                        rows_per_pass=rows_per_pass, progress=progress, desc="faithfulness", autocast=autocast)
    m = metric_values(out, metric).double().mean(dim=1)  # [configs]
    m_all, m_none = float(m[0]), float(m[1])
    span = m_all - m_none
    if span == 0 or not math.isfinite(span):
        warnings.warn(f"m(all kept) = {m_all:.6g} and m(none kept) = {m_none:.6g}: ablating every head does not change "
                      f"the {metric}, so faithfulness is undefined (NaN)", stacklevel=2)
    rows, i = [], 2
    for name in rankings:
        per_order = []
        for _ in orders[name]:
            per_order.append(m[i:i + len(inner)])
            i += len(inner)
        mean_inner = torch.stack(per_order).mean(dim=0)
        for k in grid:
            value = m_none if k == 0 else m_all if k == N else float(mean_inner[inner.index(k)])
            rows.append({"method": name, "k": k, "fraction": k / N, "metric": value,
                         "normalized": (value - m_none) / span if span != 0 else float("nan")})
    frame = pd.DataFrame(rows, columns=["method", "k", "fraction", "metric", "normalized"])
    meta = {"model": models.model_name(model), "task": data.name, "n_rows": len(data), "n_layers": L, "n_heads": H,
            "ablation": label, "reference": reference.name if reference is not None else None, "metric": metric,
            "grid": grid, "n_random": n_random, "seed": seed, "methods": list(rankings),
            "random_methods": [n for n, r in rankings.items() if r is None],
            "data_fingerprint": data.fingerprint(), "versions": library_versions(),
            **models.precision_meta(model, autocast)}
    return FaithfulnessResult(frame, {"all": m_all, "none": m_none}, meta,
                              {name: s.float() for name, s in scores.items()})


class _CallableModule(types.ModuleType):
    """``chg_lens.faithfulness`` is this module and, when called, the function :func:`faithfulness`
    (``chg_lens.faithfulness(model, data, rankings)``), so the package can export the function
    under the module's own name without hiding the module (``chg_lens.faithfulness.FaithfulnessResult``)."""

    def __call__(self, *args, **kwargs) -> FaithfulnessResult:
        return faithfulness(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
