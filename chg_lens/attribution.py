"""Attribution patching (AtP) through the gates: a linear estimate of every head's patch or
ablation from one forward and one backward pass per batch.

Activation patching (:func:`chg_lens.patching.patch_heads`) runs one configuration per head. AtP
(Nanda 2023; Kramár et al. 2024) replaces each patch by its first-order Taylor estimate on the run
being scored::

    effect_h  ~=  sum over positions and d_head of (z_source - z_run) * d metric / d z_run

which is minus the gradient of the metric with respect to head ``h``'s gate at ``g = 1`` of the
gate hook ``z <- g * z + (1 - g) * source`` (:mod:`chg_lens.gates`). So attribution runs on the
scoring engine's differentiable path (:func:`chg_lens.scoring.gate_gradients`): gates shaped
``[rows, n_layers, n_heads]``, one configuration per row, one backward per batch for every head
and every prompt.

Two forms:

- **pairs** (``corrupted`` given, ``source="clean"``): the run is the corrupted prompts (scored on
  the clean prompts' answers, as ``patch_heads`` does) and the source is the clean run's ``z``; the
  effect estimates ``patch_heads``'s indirect effect, with the same result columns.
- **single run** (no ``corrupted``; ``source="zero"`` or ``"mean"``): the run is the data itself
  and the source is zero or the mean ``z`` over ``reference``: the attribution of zero or mean
  ablation, for tasks without corrupted twins (every CHG task). The effect is negative for heads
  whose ablation hurts.

The estimate is exact for a metric linear in the head's ``z``. It fails where the metric bends
over the size of the change: large effects (a head whose patch flips the answer), saturated
softmaxes (a probability near 0 or 1 has a near-zero gradient however large the change: AtP
underestimates, ``metric="prob"`` worst), and attention patterns that the change itself moves
(the gradient does not see a later query attending elsewhere). See docs/ablation_patching.md.

Example::

    from chg_lens.attribution import attribute_heads
    clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=32)
    atp = attribute_heads(model, clean, corrupted)          # ~ patch_heads(model, clean, corrupted)
    atp.frame.nlargest(5, "effect")                         # layer, head, effect, se, t, p, mediating
    ablate = attribute_heads(model, val, source="mean")     # the single-run form
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import models, scoring
from .data import TaskDataset
from .pairs import (HeadEffectResult, check_effect_options, check_pair, effect_frame, effect_heads, metric_values,
                    position_mask, resolve_metric)
from .results import library_versions

SOURCES = ("auto", "clean", "zero", "mean")
"""``source=`` of :func:`attribute_heads`."""


@dataclass
class AttributionResult(HeadEffectResult):
    """The result of :func:`attribute_heads`: the fields, columns and methods of
    :class:`chg_lens.patching.PatchResult` (``frame``: ``layer, head, effect, se, t, p,
    mediating``; ``per_prompt`` ``[heads, rows]``; ``baseline``; ``meta``; ``.effects``
    ``[n_layers, n_heads]``; ``.tensor(col)``), of kind "attribution" (``chg_lens.load`` opens it).
    ``meta`` records ``source``, ``metric``, ``positions`` and the precision."""

    kind = "attribution"
    noun = "an attribution result"
    IDENTITY = HeadEffectResult.IDENTITY + ("source", "positions", "task")


def _resolve_source(source: Any, corrupted: TaskDataset | None) -> str:
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    if source == "auto":
        return "clean" if corrupted is not None else "mean"
    if source == "clean" and corrupted is None:
        raise ValueError("source='clean' patches the clean z into the corrupted run: pass corrupted "
                         "(or source='zero' / 'mean' for the single-run form)")
    if source in ("zero", "mean") and corrupted is not None:
        raise ValueError(f"source={source!r} is the single-run form (attribution of {source} ablation on the data "
                         "itself): leave corrupted out, or use source='clean' for the pair")
    return source


def attribute_heads(
    model,
    clean: TaskDataset,
    corrupted: TaskDataset | None = None,
    *,
    source: str = "auto",
    reference: TaskDataset | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    positions: Any = "all",
    metric: str = "auto",
    mediating: str = "std",
    n_std: float = 3.0,
    alpha: float = 0.05,
    batch_size: int = 32,
    progress: bool = False,
    autocast: str | None = "off",
) -> AttributionResult:
    """Attribution patching of every head (or ``heads``) through the gates; the same call and
    result shape as :func:`chg_lens.patching.patch_heads`.

    Per prompt, ``effect_h = sum over positions and d_head of (z_source - z_run) * d metric / d z``
    on the run, computed as ``-d metric / d g_h`` at ``g = 1`` of the gate hook
    ``z <- g * z + (1 - g) * source``: one forward and one backward per batch of ``batch_size``
    rows for all heads (:func:`chg_lens.scoring.gate_gradients`).

    - ``source``: ``"auto"`` (``"clean"`` when ``corrupted`` is given, else ``"mean"``),
      ``"clean"`` (AtP: the run is ``corrupted``, scored on ``clean``'s targets and answers, with the
      clean ``z`` as source), ``"zero"`` or ``"mean"`` (the single-run form: the run is ``clean``
      itself; ``"mean"`` takes the mean ``z`` over ``reference``, default the data). In the
      single-run form the effect estimates ``m(head ablated) - m(run)``, negative for heads that
      help, and ``mediating`` and ``p`` are computed on ``-effect``.
    - ``metric``: ``"logit_diff"`` (needs ``clean.row_meta["answers"]``), ``"logprob"`` (summed
      target log-prob) or ``"prob"``; ``"auto"`` picks logit_diff when answers exist.
    - ``positions``: where the source is mixed in (:func:`chg_lens.pairs.position_mask`).
    - ``mediating``, ``n_std``, ``alpha``: :func:`chg_lens.pairs.label_mediating`.
    - ``autocast``: precision of the pass (default ``"off"``: the model's own dtype, exact).

    The linear estimate is good for small changes and fails for large effects and saturated
    softmaxes (see the module docstring and docs/ablation_patching.md); check the heads it ranks
    first with :func:`chg_lens.patching.patch_heads`.

    Example::

        clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=32)
        res = attribute_heads(model, clean, corrupted)
        res.effects                                      # [n_layers, n_heads], like patch_heads
        attribute_heads(model, val, source="zero", metric="logprob").frame.nsmallest(5, "effect")
    """
    if not isinstance(clean, TaskDataset):
        raise TypeError(f"clean must be a TaskDataset; got {type(clean).__name__}")
    source = _resolve_source(source, corrupted)
    if corrupted is not None:
        check_pair(clean, corrupted)
    if reference is not None and source != "mean":
        raise ValueError(f"reference is the data of the mean z (source='mean'); source is {source!r}")
    if reference is not None and not isinstance(reference, TaskDataset):
        raise TypeError(f"reference must be a TaskDataset; got {type(reference).__name__}")
    batch_size = check_effect_options(mediating, n_std, alpha, batch_size)
    metric = resolve_metric(metric, clean)
    run = corrupted if corrupted is not None else clean
    ctx = scoring.context(model, clean, corrupted, reference, autocast=autocast)  # model and data, once
    model = ctx.model
    heads = effect_heads(heads, ctx.n_layers, ctx.n_heads)
    pos = position_mask(run, positions)
    answers = scoring._check_answers(clean, "auto") if metric == "logit_diff" else None

    if source == "clean":
        sources = scoring._collect_z(ctx, clean, mean=False, batch_size=batch_size)
    elif source == "mean":
        sources = scoring._collect_z(ctx, reference if reference is not None else clean, mean=True,
                                     batch_size=batch_size)
    else:
        sources = None
    out = scoring._gate_gradients(ctx, run, lambda s: metric_values(s, metric), sources, pos, answers=answers,
                                  batch_size=batch_size, progress=progress, desc="attribution")
    index_l = torch.tensor([l for l, _ in heads])
    index_h = torch.tensor([h for _, h in heads])
    per_prompt = -out.grads[:, index_l, index_h].T.contiguous()  # [heads, rows]
    sign = 1 if source == "clean" else -1
    frame = effect_frame(heads, per_prompt, mediating, n_std, alpha, sign=sign)
    run_value = float(out.values.mean())
    run_accuracy = float(out.scores.correct.float().mean())
    if corrupted is not None:
        clean_run = scoring._score_configs(ctx, clean, None, answers=answers, batch_size=batch_size)
        baseline = {"clean": float(metric_values(clean_run, metric).mean()), "corrupted": run_value,
                    "clean_accuracy": float(clean_run.correct.float().mean()), "corrupted_accuracy": run_accuracy}
    else:
        baseline = {"clean": run_value, "clean_accuracy": run_accuracy}
    meta = {"model": models.model_name(model), "task": clean.name,
            "corruption": corrupted.name if corrupted is not None else None,
            "source": source, "reference": (reference.name if reference is not None else clean.name)
            if source == "mean" else None,
            "n_rows": len(run), "n_layers": models.n_layers(model), "n_heads": models.n_heads(model),
            "metric": metric, "positions": positions if isinstance(positions, (str, list)) else "mask",
            "mediating_rule": mediating, "n_std": n_std, "alpha": alpha, "data_fingerprint": run.fingerprint(),
            "versions": library_versions(), **ctx.precision_meta}
    return AttributionResult(frame, per_prompt, baseline, meta)
