"""Causal mediation analysis (activation patching) on the gate mechanism.

A patch is a gate of 0 whose source is another run's ``z``: ``z <- g * z_corrupted + (1 - g) *
z_clean``. :func:`patch_heads` caches every head's ``z`` on the clean prompts (read-only hooks),
then scores the corrupted prompts with one head at a time patched from the clean run, many heads
per forward pass, at all positions or chosen ones. The indirect effect of a head on a prompt is the
metric with the patch minus the metric of the corrupted run; the AIE is its mean over prompts.

Presets: :func:`ioi_patching` (ABC corruption), :func:`function_vector_patching` (Todd et al.:
answers shuffled, last position, mediating = mean + 3 std), :func:`symbolic_patching` (Yang et
al.: abstraction, symbolic induction and retrieval heads by significance), and
:func:`compare_chg_cma` (the paper's Figure 4: max facilitation over seeds vs CMA, Welch t-test).

Example::

    from chg_lens import patching
    res = patching.ioi_patching(model, n_prompts=32)
    res.frame.sort_values("effect", ascending=False).head()   # layer, head, effect, se, mediating
    res.effects                                               # [n_layers, n_heads] AIE
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from . import checks, models, scoring
from . import gates as gates_mod
from .deprecation import keyword_only, renamed
from .data import TaskDataset
from .pairs import (METRICS, RULES, HeadEffectResult, check_effect_options, check_pair, effect_frame,  # noqa: F401
                    effect_heads, label_mediating, metric_values, position_mask, resolve_metric)
from .scoring import all_heads, check_heads, collect_z, score_configs  # noqa: F401 (patching.score_configs)
from .results import library_versions
from .tasks.symbolic import SYMBOLIC_KINDS, symbolic_pairs  # noqa: F401  (moved to tasks/symbolic.py)

# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class PatchResult(HeadEffectResult):
    """Per head: ``frame`` (``layer, head, effect`` (AIE), ``se``, ``t``, ``p``, ``mediating``),
    ``per_prompt`` indirect effects ``[n_heads_patched, rows]``, and the clean/corrupted baselines
    (the fields and methods of :class:`chg_lens.pairs.HeadEffectResult`)."""

    kind = "patching"
    noun = "a patching result"


_metric = metric_values  # the name of earlier releases


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------


def clean_z(model, data: TaskDataset, batch_size: int = 32) -> dict[int, Float[Tensor, "rows pos head d_head"]]:
    """Every head's ``z`` on ``data`` (CPU), batch by batch; the source of a patch
    (:func:`chg_lens.scoring.collect_z` with ``mean=False``)."""
    return collect_z(model, data, mean=False, batch_size=batch_size)


@keyword_only("heads", "positions", "metric", "mediating", "n_std", "alpha", "prefix_reuse", "batch_size", "rows_per_pass", "progress")
@renamed(max_rows_per_pass="rows_per_pass")
def patch_heads(
    model,
    clean: TaskDataset,
    corrupted: TaskDataset,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    positions: Any = "all",
    metric: str = "auto",
    mediating: str = "std",
    n_std: float = 3.0,
    alpha: float = 0.05,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "off",
) -> PatchResult:
    """Patch each head's ``z`` from the clean run into the corrupted run, one head per
    configuration, many configurations per pass.

    The corrupted rows are scored on their own targets (in the presets the clean answer).
    ``metric``: ``"logit_diff"`` (needs ``row_meta["answers"]`` = [correct, wrong] on ``clean``),
    ``"logprob"`` (summed target log-prob) or ``"prob"``; ``"auto"`` picks logit_diff when answers
    exist. ``positions``: see :func:`position_mask`. ``mediating``: see :func:`label_mediating`.
    ``autocast``: the precision of the patched passes (default ``"off"``: the model's own dtype, so
    effects equal TransformerLens's patching module; ``"auto"``/``"bf16"`` for speed, see
    :func:`chg_lens.models.resolve_autocast`); the clean ``z`` is recorded in the model's dtype.

    Example::

        clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=32)
        res = patch_heads(model, clean, corrupted, positions="all")
    """
    check_pair(clean, corrupted)
    ctx = scoring.context(model, corrupted, clean, autocast=autocast)  # every check of model and data, once
    model = ctx.model
    batch_size = check_effect_options(mediating, n_std, alpha, batch_size)
    rows_per_pass = checks.positive_int("rows_per_pass", rows_per_pass)
    metric = resolve_metric(metric, clean)
    heads = effect_heads(heads, ctx.n_layers, ctx.n_heads)
    pos = position_mask(corrupted, positions)
    answers = scoring._check_answers(clean, "auto") if metric == "logit_diff" else None

    src = scoring._collect_z(ctx, clean, mean=False, batch_size=batch_size)
    ones = gates_mod.ones(model)
    configs = torch.cat([ones[None], gates_mod.single_head_configs(model, heads, 0.0)])
    kw = dict(answers=answers, batch_size=batch_size, rows_per_pass=rows_per_pass)
    patched = scoring._score_configs(ctx, corrupted, configs, src, pos, prefix_reuse=prefix_reuse,
                                     progress=progress, desc="patching", **kw)
    clean_run = scoring._score_configs(ctx, clean, ones[None], **kw)
    values = metric_values(patched, metric)
    ie = values[1:] - values[0:1]  # [heads, rows]
    n = ie.shape[1]
    frame = effect_frame(heads, ie, mediating, n_std, alpha)
    baseline = {"clean": float(metric_values(clean_run, metric).mean()), "corrupted": float(values[0].mean()),
                "clean_accuracy": float(clean_run.correct.float().mean()),
                "corrupted_accuracy": float(patched.correct[0].float().mean())}
    meta = {"model": models.model_name(model), "task": clean.name, "corruption": corrupted.name,
            "n_rows": n, "n_layers": models.n_layers(model), "n_heads": models.n_heads(model),
            "metric": metric, "positions": positions if isinstance(positions, (str, list)) else "mask",
            "mediating_rule": mediating, "n_std": n_std, "alpha": alpha, "versions": library_versions(),
            **ctx.precision_meta}
    return PatchResult(frame, ie, baseline, meta)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def ioi_patching(model, n_prompts: int = 64, seed: int = 0, positions: Any = "all", metric: str = "logit_diff",
                 **kwargs) -> PatchResult:
    """IOI with ABC corruption (the second subject replaced by a third name); logit difference
    IO - S. Name movers (late heads that copy the IO) get the largest effects.

    Example::

        ioi_patching(model, n_prompts=32).frame.nlargest(5, "effect")
    """
    from .tasks import ioi_pairs

    model = models.as_model(model)
    clean, corrupted = ioi_pairs(model, n_prompts=n_prompts, seed=seed)
    return patch_heads(model, clean, corrupted, positions=positions, metric=metric, **kwargs)


def function_vector_patching(
    model, task: str = "antonym", n_prompts: int = 64, n_shots: int = 10, seed: int = 0, data_dir: Any = None,
    metric: str = "prob", n_std: float = 3.0, **kwargs,
) -> PatchResult:
    """Todd et al.'s function-vector CMA: clean 10-shot prompts vs the same prompts with the example
    answers shuffled; each head's clean ``z`` is patched at the last position only; the effect is
    the gain in the correct answer's probability; mediating heads have AIE > mean + 3 std.

    Example::

        function_vector_patching(model, "antonym", data_dir="../shared/data/function_vectors")
    """
    from .tasks.function_vectors import fv_pairs

    model = models.as_model(model)
    clean, corrupted = fv_pairs(model, task=task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, data_dir=data_dir)
    return patch_heads(model, clean, corrupted, positions="last", metric=metric, mediating="std", n_std=n_std, **kwargs)


def symbolic_patching(
    model, kinds: Sequence[str] = SYMBOLIC_KINDS, n_prompts: int = 64, seed: int = 0, alpha: float = 0.05, **kwargs,
) -> dict[str, PatchResult]:
    """Yang et al.'s three CMA screens on ABA/ABB prompts (see :func:`symbolic_pairs`); heads are
    labelled by significance (one-sided t-test, Bonferroni over heads). Returns ``{kind: result}``.

    Example::

        res = symbolic_patching(model, n_prompts=32)
        res["induction"].mediating_heads()
    """
    model = models.as_model(model)
    out = {}
    for kind in kinds:
        clean, corrupted, pos = symbolic_pairs(model, kind, n_prompts, seed)
        out[kind] = patch_heads(model, clean, corrupted, positions=pos, metric="logit_diff",
                                mediating="significance", alpha=alpha, **kwargs)
        out[kind].meta["kind"] = kind
    return out


def symbolic_frame(results: dict[str, PatchResult]) -> pd.DataFrame:
    """One row per head: ``layer, head, effect`` (the largest effect over kinds), ``se``,
    ``mediating`` (significant for any kind) and ``head_type`` (the significant kind with the largest
    t, or "insignificant"), as in the paper's Figure 4b."""
    frames = []
    for kind, res in results.items():
        f = res.frame[["layer", "head", "effect", "se", "t", "mediating"]].copy()
        f["kind"] = kind
        frames.append(f)
    long = pd.concat(frames, ignore_index=True)
    best = long.sort_values("effect", ascending=False).groupby(["layer", "head"], as_index=False).first()
    sig = long[long["mediating"]].sort_values("t", ascending=False).groupby(["layer", "head"], as_index=False).first()
    best = best.merge(sig[["layer", "head", "kind"]].rename(columns={"kind": "head_type"}), on=["layer", "head"], how="left")
    best["head_type"] = best["head_type"].fillna("insignificant")
    best["mediating"] = best["head_type"] != "insignificant"
    return best[["layer", "head", "effect", "se", "mediating", "head_type"]].sort_values(["layer", "head"], ignore_index=True)


# --------------------------------------------------------------------------------------------
# CHG against CMA (the paper's Figure 4)
# --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Welch t-test of max-over-seeds facilitation, mediating vs other heads, and the per-head frame
    (``layer, head, facilitation, effect, mediating``)."""

    frame: pd.DataFrame
    t: float
    dof: float
    p: float
    mean_mediating: float
    mean_other: float
    n_mediating: int
    n_other: int

    def summary(self) -> str:
        return (f"facilitation: mediating {self.mean_mediating:.3f} (n={self.n_mediating}) vs other "
                f"{self.mean_other:.3f} (n={self.n_other}); Welch t({self.dof:.2f}) = {self.t:.2f}, p = {self.p:.3g}")


def compare_chg_cma(chg: Any, cma: HeadEffectResult | pd.DataFrame) -> Comparison:
    """Per head, the maximum facilitation over CHG seeds against the CMA score; Welch t-test
    (``scipy.stats.ttest_ind(equal_var=False)``) of facilitation for mediating vs other heads.

    ``chg``: a :class:`~chg_lens.chg.CHGResult` or its ``scores()`` frame. ``cma``: a
    :class:`PatchResult` or a frame with ``layer, head, effect, mediating`` (e.g.
    :func:`symbolic_frame`).

    Example::

        cmp = compare_chg_cma(result, function_vector_patching(model, "antonym", data_dir=...))
        cmp.t, cmp.dof, cmp.p, cmp.summary()
    """
    from scipy import stats

    scores = chg.scores() if hasattr(chg, "scores") else chg
    fac = scores.groupby(["layer", "head"], as_index=False)["facilitation"].max()
    cma_frame = cma.frame if isinstance(cma, HeadEffectResult) else cma
    missing = {"layer", "head", "effect", "mediating"} - set(cma_frame.columns)
    if missing:
        raise ValueError(f"the CMA frame lacks columns {sorted(missing)}")
    frame = fac.merge(cma_frame[["layer", "head", "effect", "mediating"]], on=["layer", "head"], how="inner")
    if frame.empty:
        raise ValueError("no head appears in both the CHG result and the CMA result; same model?")
    frame["mediating"] = frame["mediating"].astype(bool)
    med, other = frame.loc[frame["mediating"], "facilitation"], frame.loc[~frame["mediating"], "facilitation"]
    if len(med) < 2 or len(other) < 2:
        raise ValueError(f"a Welch t-test needs at least 2 heads per group; got {len(med)} mediating and {len(other)} other")
    res = stats.ttest_ind(med.to_numpy(), other.to_numpy(), equal_var=False)
    dof = getattr(res, "df", None)
    if dof is None:  # older scipy: the Welch-Satterthwaite degrees of freedom
        v1, v2 = med.var() / len(med), other.var() / len(other)
        dof = (v1 + v2) ** 2 / (v1 ** 2 / (len(med) - 1) + v2 ** 2 / (len(other) - 1))
    return Comparison(frame, float(res.statistic), float(dof), float(res.pvalue), float(med.mean()),
                      float(other.mean()), int(len(med)), int(len(other)))
