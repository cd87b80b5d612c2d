"""Ablation sweeps on the gate mechanism: an ablation is a gate of 0.

Zero ablation is a gate of 0 with no source; mean ablation is a gate of 0 whose source is the mean
``z`` over a reference data set (:func:`mean_z`, read by hooks that change nothing). Every sweep
scores many gate configurations per forward pass (rows of the batch = configurations x prompts)
through :func:`chg_lens.scoring.score_configs`, and, where the configurations agree below some
layer, starts the pass at that layer from a residual stream computed once (prefix reuse).

Example::

    from chg_lens import ablation
    sweep = ablation.head_sweep(model, val)                    # every head zero-ablated in turn
    sweep.frame.sort_values("delta_logprob").head()            # layer, head, logprob, ..., delta_*
    sweep.tensor("delta_logprob")                              # [n_layers, n_heads]
    seq = ablation.sequential_ablation(model, val, order="backward")
    fig2 = ablation.figure2(model, val, chg_result)            # the paper's Figure 2 test
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from . import checks, models, scoring
from . import gates as gates_mod
from .deprecation import keyword_only, renamed
from .data import TaskDataset
from .scoring import Heads, all_heads, check_heads, collect_z, metrics, score_configs  # noqa: F401 (ablation.metrics, .all_heads: see CHANGELOG)
from .results import FrameResult, library_versions

METHODS = ("zero", "mean")
ORDERS = ("forward", "backward", "random")


@torch.no_grad()
def mean_z(model, reference: TaskDataset, batch_size: int = 32) -> dict[int, Float[Tensor, "head d_head"]]:
    """Mean ``z`` per layer and head over every real (non-padding) position of ``reference``; the
    source of mean ablation (:func:`chg_lens.scoring.collect_z` with ``mean=True``).

    Example::

        means = mean_z(model, train)
        score_configs(model, val, configs, sources=means)      # mean ablation
    """
    return collect_z(model, reference, mean=True, batch_size=batch_size)


def _check_method(method: str, reference: TaskDataset | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if reference is not None and not isinstance(reference, TaskDataset):
        raise TypeError(f"reference must be a TaskDataset; got {type(reference).__name__}")


def _sources(ctx: scoring.Context, method: str, reference: TaskDataset | None, data: TaskDataset, batch_size: int):
    """The sources of ``method`` (None for zero ablation); ``reference`` is checked in ``ctx`` already."""
    if method == "zero":
        return None
    return scoring._collect_z(ctx, reference if reference is not None else data, mean=True, batch_size=batch_size)


def _context(model, data: TaskDataset, method: str, reference: TaskDataset | None, autocast) -> scoring.Context:
    """The checks of a sweep, once: the method, then the model, ``data`` and (for mean ablation)
    ``reference`` against it, and the precision."""
    _check_method(method, reference)
    return scoring.context(model, data, reference if method == "mean" else None, autocast=autocast)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class AblationResult(FrameResult):
    """A long DataFrame (one row per configuration: ``layer``, ``head``, metrics, ``delta_*``), the
    baseline metrics (the unablated configuration) and metadata."""

    kind = "ablation"
    noun = "an ablation result"
    frame: pd.DataFrame
    baseline: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, column: str = "delta_logprob") -> Float[Tensor, "layer head"]:
        """``column`` as an ``[n_layers, n_heads]`` tensor (single-head sweeps; NaN where absent)."""
        return super().tensor(column)

    def tensors_to_save(self) -> dict[str, Tensor]:
        if {"layer", "head"} <= set(self.frame.columns) and "step" not in self.frame.columns:
            return {"delta_logprob": self.tensor("delta_logprob")}
        return {}


def _meta(ctx: scoring.Context, data: TaskDataset, **extra) -> dict[str, Any]:
    return {"model": models.model_name(ctx.model), "task": data.name, "n_rows": len(data),
            "n_layers": ctx.n_layers, "n_heads": ctx.n_heads,
            "data_fingerprint": data.fingerprint(), "versions": library_versions(),
            **ctx.precision_meta, **extra}


def _with_deltas(frame: pd.DataFrame, values: dict[str, Tensor], baseline: dict[str, float]) -> pd.DataFrame:
    for name, v in values.items():
        frame[name] = v.double().numpy()
    for name, v in values.items():
        frame[f"delta_{name}"] = v.double().numpy() - baseline[name]
    return frame


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


@keyword_only("heads", "method", "reference", "base", "prefix_reuse", "batch_size", "rows_per_pass", "progress")
@renamed(max_rows_per_pass="rows_per_pass")
def head_sweep(
    model,
    data: TaskDataset,
    *,
    heads: Heads | None = None,
    method: str = "zero",
    reference: TaskDataset | None = None,
    base: Float[Tensor, "layer head"] | None = None,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "off",
) -> AblationResult:
    """Ablate every head (or ``heads``) on its own (the "individual" mode), many heads per pass.

    ``method``: ``"zero"`` or ``"mean"`` (mean ``z`` over ``reference``, default ``data``). ``base``
    gates the other heads (default: all open). ``delta_*`` columns are ablated minus baseline.

    Example::

        sweep = head_sweep(model, val, method="mean", reference=train)
        sweep.tensor("delta_logprob")      # [n_layers, n_heads]
    """
    ctx = _context(model, data, method, reference, autocast)
    model = ctx.model
    heads = all_heads(model) if heads is None else [(int(l), int(h)) for l, h in heads]
    check_heads(model, heads)
    L, H = ctx.n_layers, ctx.n_heads
    start = gates_mod.ones(model) if base is None else checks.gate_tensor("base", base, (L, H)).detach().float().cpu()
    src = _sources(ctx, method, reference, data, batch_size)
    configs = torch.cat([start[None], gates_mod.single_head_configs(model, heads, 0.0, start)])
    scores = scoring._score_configs(ctx, data, configs, src, base=start, answers=scoring._check_answers(data, "auto"),
                                    prefix_reuse=prefix_reuse, batch_size=batch_size, rows_per_pass=rows_per_pass,
                                    progress=progress, desc="head sweep")
    values = metrics(scores)
    baseline = {k: float(v[0]) for k, v in values.items()}
    frame = pd.DataFrame({"layer": [l for l, _ in heads], "head": [h for _, h in heads]})
    frame = _with_deltas(frame, {k: v[1:] for k, v in values.items()}, baseline)
    return AblationResult(frame, baseline, _meta(ctx, data, mode="individual", method=method))


def head_order(model, order: str | Heads = "forward", seed: int = 0) -> list[tuple[int, int]]:
    """Heads in ``"forward"`` (layer 0 head 0 first), ``"backward"``, ``"random"`` (seeded) or a
    given order (a list of ``(layer, head)``)."""
    heads = all_heads(model)
    if isinstance(order, str):
        if order == "forward":
            return heads
        if order == "backward":
            return heads[::-1]
        if order == "random":
            random.Random(seed).shuffle(heads)
            return heads
        raise ValueError(f"order must be one of {ORDERS} or a list of (layer, head); got {order!r}")
    given = [(int(l), int(h)) for l, h in order]
    check_heads(model, given)
    if len(set(given)) != len(given):
        raise ValueError("the given order names a head more than once")
    return given


@keyword_only("order", "method", "reference", "base", "n_steps", "seed", "prefix_reuse", "batch_size", "rows_per_pass", "progress")
@renamed(max_rows_per_pass="rows_per_pass")
def sequential_ablation(
    model,
    data: TaskDataset,
    *,
    order: str | Heads = "forward",
    method: str = "zero",
    reference: TaskDataset | None = None,
    base: Float[Tensor, "layer head"] | None = None,
    n_steps: int | None = None,
    seed: int = 0,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "off",
) -> AblationResult:
    """Cumulative ablation: step ``i`` ablates the first ``i`` heads of ``order`` (see
    :func:`head_order`); all steps share forward passes. The frame has ``step`` (1..n) and the
    ``layer``/``head`` ablated at that step.

    Example::

        seq = sequential_ablation(model, val, order="random", seed=1, n_steps=40)
        seq.frame[["step", "layer", "head", "delta_logprob"]]
    """
    ctx = _context(model, data, method, reference, autocast)
    model = ctx.model
    if n_steps is not None:
        n_steps = checks.positive_int("n_steps", n_steps)
    heads = head_order(model, order, seed)[: n_steps]
    L, H = ctx.n_layers, ctx.n_heads
    start = torch.ones(L, H) if base is None else checks.gate_tensor("base", base, (L, H)).detach().float().cpu()
    src = _sources(ctx, method, reference, data, batch_size)
    configs = start.repeat(len(heads) + 1, 1, 1)
    for i, (l, h) in enumerate(heads):
        configs[i + 1 :, l, h] = 0.0
    scores = scoring._score_configs(ctx, data, configs, src, base=start, answers=scoring._check_answers(data, "auto"),
                                    prefix_reuse=prefix_reuse, batch_size=batch_size, rows_per_pass=rows_per_pass,
                                    progress=progress, desc="sequential")
    values = metrics(scores)
    baseline = {k: float(v[0]) for k, v in values.items()}
    frame = pd.DataFrame({"step": range(1, len(heads) + 1), "layer": [l for l, _ in heads],
                          "head": [h for _, h in heads]})
    frame = _with_deltas(frame, {k: v[1:] for k, v in values.items()}, baseline)
    label = order if isinstance(order, str) else "given"
    meta = _meta(ctx, data, mode="sequential", method=method, order=label, seed=seed)
    return AblationResult(frame, baseline, meta)


@keyword_only("seeds", "scores", "n_steps", "method", "reference", "prefix_reuse", "batch_size", "rows_per_pass", "progress")
@renamed(max_rows_per_pass="rows_per_pass")
def figure2(
    model,
    data: TaskDataset,
    result,
    *,
    seeds: int | Sequence[int] | str = "each",
    scores: Sequence[str] = ("facilitation", "irrelevance", "interference"),
    n_steps: int | None = None,
    method: str = "zero",
    reference: TaskDataset | None = None,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "off",
) -> AblationResult:
    """The paper's Figure 2 test from a fitted :class:`~chg_lens.chg.CHGResult`.

    For each seed's G+ and each score, heads are sorted by that seed's score (descending) and set
    one at a time, cumulatively, to 1 ("retained") and to 0 ("ablated"), starting from G+. The
    frame has ``score, seed, step (1..n), layer, head`` (the head toggled at that step),
    ``logprob_retained, logprob_ablated, delta_logprob`` (= ablated - retained; mean over rows of
    the summed target log-prob), and the same for accuracy. The taxonomy predicts: facilitation
    falls, irrelevance stays near 0, interference rises while interfering heads remain.

    Example::

        fig = figure2(model, val, result, seeds=0, n_steps=50)
        fig.frame.groupby(["score", "step"]).delta_logprob.mean()
    """
    from .taxonomy import SCORES

    ctx = _context(model, data, method, reference, autocast)
    model = ctx.model
    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise ValueError(f"scores must be among {SCORES}; got {bad}")
    g_plus = result.g_plus.detach().float().cpu()
    L, H = ctx.n_layers, ctx.n_heads
    if tuple(g_plus.shape[1:]) != (L, H):
        raise ValueError(f"the CHG result is for [{g_plus.shape[1]}, {g_plus.shape[2]}] heads; the model has [{L}, {H}]")
    checks.gate_tensor("the CHG result's g_plus", g_plus, (L, H), trailing=True)  # every config's values, once
    seed_list = list(range(g_plus.shape[0])) if seeds == "each" else ([seeds] if isinstance(seeds, int) else list(seeds))
    if any(not 0 <= s < g_plus.shape[0] for s in seed_list):
        raise ValueError(f"seeds must be in [0, {g_plus.shape[0]}); got {seed_list}")
    table = result.scores()
    src = _sources(ctx, method, reference, data, batch_size)
    n = L * H if n_steps is None else min(int(n_steps), L * H)
    configs, labels = [], []
    for s in seed_list:
        per_seed = table[table["seed"] == s]
        for score in scores:
            ranked = per_seed.sort_values([score, "layer", "head"], ascending=[False, True, True], kind="stable")
            heads = list(zip(ranked["layer"].astype(int), ranked["head"].astype(int)))[:n]
            kept, dropped = g_plus[s].clone(), g_plus[s].clone()
            for step, (l, h) in enumerate(heads, start=1):
                kept[l, h], dropped[l, h] = 1.0, 0.0
                configs += [kept.clone(), dropped.clone()]
                labels.append((score, s, step, l, h))
    cfg = torch.stack(configs)
    # Prefix reuse relative to each config's own G+: run the seeds separately so 'base' is that G+.
    lp = torch.zeros(cfg.shape[0])
    acc = torch.zeros(cfg.shape[0])
    per = 2 * n * len(scores)
    for i, s in enumerate(seed_list):
        part = slice(i * per, (i + 1) * per)
        sc = scoring._score_configs(ctx, data, cfg[part], src, base=g_plus[s], prefix_reuse=prefix_reuse,
                                    batch_size=batch_size, rows_per_pass=rows_per_pass, progress=progress,
                                    desc=f"figure 2, seed {s}")
        lp[part] = sc.logprob_sum.mean(dim=1)
        acc[part] = sc.correct.float().mean(dim=1)
    frame = pd.DataFrame(labels, columns=["score", "seed", "step", "layer", "head"])
    frame["logprob_retained"] = lp[0::2].double().numpy()
    frame["logprob_ablated"] = lp[1::2].double().numpy()
    frame["delta_logprob"] = frame["logprob_ablated"] - frame["logprob_retained"]
    frame["accuracy_retained"] = acc[0::2].double().numpy()
    frame["accuracy_ablated"] = acc[1::2].double().numpy()
    frame["delta_accuracy"] = frame["accuracy_ablated"] - frame["accuracy_retained"]
    base_scores = scoring._score_configs(ctx, data, g_plus[seed_list], src, prefix_reuse=False,
                                         batch_size=batch_size, rows_per_pass=rows_per_pass)
    baseline = {f"g_plus_seed{s}": float(v) for s, v in zip(seed_list, base_scores.logprob_sum.mean(dim=1))}
    meta = _meta(ctx, data, mode="figure2", method=method, seeds=seed_list, scores=list(scores),
                 n_steps=n, chg_task=result.meta.get("task"))
    return AblationResult(frame, baseline, meta)
