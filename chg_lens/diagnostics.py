"""Convergence diagnostics for gate fits: small pure functions on tensors and frames, used by
:class:`~chg_lens.chg.CHGResult` and :class:`~chg_lens.contrastive.ContrastiveResult` (and by the
fitting loop when it stops a stage once settled).

A stage of one seed has *settled* when, over the last ``window`` share of the stage's planned
updates (at least ``min_window`` updates, at most the whole stage):

- at most ``max_moving`` of its gates moved by more than ``move`` (gate at the end against the
  gate at the window's start), and
- its NLL has stopped falling: the least-squares line through the per-update NLL over the window
  drops by at most ``max_nll_drop`` nats, or its slope is within two standard errors of zero
  (batch-to-batch noise then hides any trend).

G0 *keeps the task* when its validation log-probability is at least the ungated model's minus
``g0_logprob_tol`` and its accuracy at least the ungated model's minus ``g0_accuracy_tol``. A CHG
fit has *converged* when every stage of every seed settled and every G0 seed kept the task.

Example::

    from chg_lens import diagnostics
    diagnostics.window_length(500)                 # 50: the last 10% of 500 updates
    diagnostics.gate_movement(start, end, move=0.05)
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor


class NotConvergedWarning(UserWarning):
    """Raised (as a warning) at the end of a fit whose diagnostics did not pass."""


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of every diagnostic, with their defaults (see the module docstring)."""

    window: float = 0.1
    """Share of a stage's planned updates that form the window at its end."""
    min_window: int = 10
    """The window has at least this many updates (or the whole stage when it is shorter)."""
    move: float = 0.05
    """A gate whose absolute change over the window exceeds this counts as moving."""
    max_moving: float = 0.05
    """Settled: at most this share of the gates are moving."""
    max_nll_drop: float = 0.05
    """Settled: the NLL's least-squares line falls by at most this (nats) over the window."""
    g0_logprob_tol: float = 0.2
    """G0 keeps the task: validation log-prob at least the ungated model's minus this (nats)."""
    g0_accuracy_tol: float = 0.05
    """G0 keeps the task: validation accuracy at least the ungated model's minus this."""

    def check(self) -> None:
        if not 0 < self.window <= 1:
            raise ValueError(f"window must be in (0, 1] (a share of the stage's updates); got {self.window}")
        if self.min_window < 1:
            raise ValueError(f"min_window must be at least 1; got {self.min_window}")
        for name in ("move", "max_moving", "max_nll_drop"):  # G0 tolerances may be negative: G0 must beat the model
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    @classmethod
    def of(cls, value: "Thresholds | dict | None" = None, **overrides: Any) -> "Thresholds":
        """``Thresholds`` from an instance, a dict or keyword overrides; unknown names are an error."""
        base = asdict(value) if isinstance(value, Thresholds) else dict(value or {})
        base.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise TypeError(f"unknown diagnostic threshold(s) {unknown}; known: {sorted(known)}")
        th = cls(**base)
        th.check()
        return th


DEFAULT = Thresholds()


# ----------------------------------------------------------------------------------- pure pieces
def window_length(updates: int, window: float = DEFAULT.window, min_window: int = DEFAULT.min_window) -> int:
    """Updates in the diagnostic window of a stage with ``updates`` planned updates."""
    return max(1, min(int(updates), max(int(min_window), math.ceil(window * updates))))


def gate_movement(start: Float[Tensor, "configs layer head"], end: Float[Tensor, "configs layer head"],
                  move: float = DEFAULT.move) -> tuple[Tensor, Tensor]:
    """Per configuration: mean absolute gate change and the share of gates that changed by more than ``move``."""
    change = (end.double() - start.double()).abs().flatten(1)
    return change.mean(dim=1), (change > move).double().mean(dim=1)


def nll_slope(trace: Float[Tensor, "updates configs"]) -> tuple[Tensor, Tensor]:
    """Least-squares slope per update of each configuration's trace, and its standard error
    (``inf`` with fewer than three points)."""
    y = trace.double()
    n = y.shape[0]
    if n < 2:
        return torch.zeros(y.shape[1:], dtype=torch.float64), torch.full(y.shape[1:], math.inf, dtype=torch.float64)
    x = torch.arange(n, dtype=torch.float64)
    xc = (x - x.mean())[:, None]
    sxx = float((xc ** 2).sum())
    slope = (xc * (y - y.mean(dim=0))).sum(dim=0) / sxx
    if n < 3:
        return slope, torch.full_like(slope, math.inf)
    resid = y - y.mean(dim=0) - slope * xc
    se = torch.sqrt((resid ** 2).sum(dim=0) / (n - 2) / sxx)
    return slope, se


def is_settled(share_moving: Tensor, slope: Tensor, slope_se: Tensor, window: int,
               th: Thresholds = DEFAULT) -> Tensor:
    """The settled rule of the module docstring, per configuration (bool tensor)."""
    still_falling = (slope * window < -th.max_nll_drop) & (slope < -2 * slope_se)
    return (share_moving <= th.max_moving) & ~still_falling


def window_start_index(snapshot_steps: Tensor, start: int) -> int:
    """Index of the latest snapshot taken at or before update ``start`` (the first one if none is)."""
    steps = snapshot_steps.tolist()
    ok = [i for i, s in enumerate(steps) if s <= start]
    return ok[-1] if ok else 0


def stage_diagnostics(snapshots: Float[Tensor, "snaps configs layer head"], snapshot_steps: Tensor,
                      nll: Float[Tensor, "updates configs"], planned_updates: int,
                      th: Thresholds = DEFAULT) -> pd.DataFrame:
    """One row per configuration of a stage: ``updates`` (taken), ``window`` (updates the movement
    is measured over), ``mean_abs_change``, ``share_moving``, ``nll_slope`` (per update),
    ``nll_change`` (slope x window) and ``settled``.

    The window ends at the last snapshot (the final gates) and starts at the latest snapshot at or
    before ``updates - window_length(planned_updates)``; fits keep a snapshot exactly there."""
    taken = int(nll.shape[0])
    w = min(window_length(planned_updates, th.window, th.min_window), taken)
    i0 = window_start_index(snapshot_steps, taken - w)
    start_step = int(snapshot_steps[i0])
    mean_abs, share = gate_movement(snapshots[i0], snapshots[-1], th.move)
    slope, se = nll_slope(nll[taken - w:])
    settled = is_settled(share, slope, se, w, th)
    return pd.DataFrame({
        "seed": range(snapshots.shape[1]), "updates": taken, "window": int(snapshot_steps[-1]) - start_step,
        "mean_abs_change": mean_abs.numpy(), "share_moving": share.numpy(), "nll_slope": slope.numpy(),
        "nll_change": (slope * w).numpy(), "settled": settled.numpy().astype(bool),
    })


def g0_task_check(validation: pd.DataFrame, th: Thresholds = DEFAULT) -> pd.DataFrame:
    """Per G0 seed: ``val_logprob``, ``val_accuracy``, the ungated model's ``ungated_logprob`` and
    ``ungated_accuracy``, and ``kept_task`` (within the tolerances of the ungated model, or better)."""
    none = validation[validation.gates == "none"].iloc[0]
    g0 = validation[validation.gates == "g0"].sort_values("seed")
    kept = (g0.logprob >= none.logprob - th.g0_logprob_tol) & (g0.accuracy >= none.accuracy - th.g0_accuracy_tol)
    return pd.DataFrame({"seed": g0.seed.astype(int).to_numpy(), "val_logprob": g0.logprob.to_numpy(),
                         "val_accuracy": g0.accuracy.to_numpy(), "ungated_logprob": float(none.logprob),
                         "ungated_accuracy": float(none.accuracy), "kept_task": kept.to_numpy().astype(bool)})


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two flat tensors (average ranks for ties; NaN if one is constant)."""
    ra = torch.tensor(pd.Series(a.flatten().double().numpy()).rank().to_numpy())
    rb = torch.tensor(pd.Series(b.flatten().double().numpy()).rank().to_numpy())
    if float(ra.std()) == 0 or float(rb.std()) == 0:
        return math.nan
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def mean_pairwise_spearman(values: Float[Tensor, "seeds ..."]) -> float:
    """Mean Spearman correlation over every pair of seeds (NaN with one seed)."""
    pairs = [spearman(values[i], values[j]) for i, j in itertools.combinations(range(values.shape[0]), 2)]
    pairs = [p for p in pairs if not math.isnan(p)]
    return sum(pairs) / len(pairs) if pairs else math.nan


def same_in_every_seed(labels: Tensor) -> float:
    """Share of heads whose label (role index, on/off) is the same in every seed (NaN with one seed)."""
    if labels.shape[0] < 2:
        return math.nan
    flat = labels.flatten(1)
    return float((flat == flat[:1]).all(dim=0).double().mean())


# ----------------------------------------------------------------------------------- reading them
def describe(frame: pd.DataFrame, agreement: dict[str, float], th: Thresholds = DEFAULT) -> list[str]:
    """Summary lines for a diagnostics frame (one row per stage and seed)."""
    lines = []
    for stage, part in frame.groupby("stage", sort=False):
        lines.append(
            f"  {stage:8s} settled {int(part.settled.sum())}/{len(part)} seeds after {int(part.updates.max())} updates; "
            f"gates moving > {th.move:g} over the last {int(part.window.max())}: {100 * part.share_moving.max():.1f}% "
            f"(worst seed), mean |change| {part.mean_abs_change.mean():.4f}, NLL slope {part.nll_slope.mean():+.2e}/update")
    if "kept_task" in frame.columns:
        g0 = frame[frame.stage == "g0"]
        if g0.kept_task.notna().all() and len(g0):
            lines.append(f"  G0 keeps the task in {int(g0.kept_task.astype(bool).sum())}/{len(g0)} seeds: validation "
                         f"logprob {g0.val_logprob.mean():.4f} vs ungated {g0.ungated_logprob.iloc[0]:.4f} "
                         f"(tolerance {th.g0_logprob_tol:g}), accuracy {g0.val_accuracy.mean():.3f} vs "
                         f"{g0.ungated_accuracy.iloc[0]:.3f} (tolerance {th.g0_accuracy_tol:g})")
        else:
            lines.append("  G0 not checked against the ungated model (no validation data)")
    if agreement:
        lines.append("  seed agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    return lines


def advice(frame: pd.DataFrame, th: Thresholds = DEFAULT, kind: str = "CHG") -> str:
    """One line that says what did not pass and what to change; empty when everything passed."""
    problems = []
    moving = frame[~frame.settled.astype(bool)]
    for stage, part in moving.groupby("stage", sort=False):
        problems.append(f"{stage} not settled in {len(part)} seed(s) ({100 * part.share_moving.max():.0f}% of gates "
                        f"moving > {th.move:g}, NLL change {part.nll_change.min():+.3f} over the last "
                        f"{int(part.window.max())} updates)")
    if "kept_task" in frame.columns:
        g0 = frame[(frame.stage == "g0") & frame.kept_task.notna()]
        lost = g0[~g0.kept_task.astype(bool)]
        if len(lost):
            problems.append(f"G0 lost the task in {len(lost)} seed(s) (validation logprob {lost.val_logprob.mean():.2f} "
                            f"vs ungated {lost.ungated_logprob.iloc[0]:.2f})")
    if not problems:
        return ""
    return f"{kind} fit did not converge: " + "; ".join(problems) + ". " + remedy(moving, th) + " See docs/diagnostics.md."


def remedy(moving: pd.DataFrame, th: Thresholds = DEFAULT) -> str:
    """What to change for the unsettled rows ``moving`` of a diagnostics frame.

    Gates that move while the NLL is still falling are drifting toward a better fit: give the stage
    more updates or a higher rate. Gates that move while the NLL is flat are walking on batch noise
    around the fit: a lower final rate (``lr_end`` / ``reg_lr_end``) or a larger batch stills them
    (measured on SmolLM2 / bigbench_syntax, experiments/README.md). A stage whose window is the whole
    stage is too short to tell the two apart and is given more updates."""
    if len(moving) == 0:  # every stage settled, so only G0 lost the task
        return "Give G0 more updates (updates), a higher learning rate (lr) or more training prompts."
    # a stage no longer than its window is too short to tell a drift from noise: it needs more updates
    falling = (moving.nll_change < -th.max_nll_drop) | (moving.window >= moving.updates)
    tips = []
    if falling.any():
        tips.append("more updates (updates/reg_updates) or a higher learning rate (lr/reg_lr) where the NLL still falls or the stage is short")
    if (~falling).any():
        tips.append("a lower final learning rate (lr_end/reg_lr_end, e.g. 0.01) or a larger batch (batch_size) "
                    "where the gates move but the NLL is flat")
    if set(moving.stage) <= {"g_plus", "g_minus"}:
        tips.append("as only G+/G- move, another lambda (lam) may settle them")
    return "Give it " + "; ".join(tips) + "."


def warn_if_not_converged(message: str) -> None:
    """A :class:`NotConvergedWarning` with ``message`` (nothing when it is empty), pointing at the
    first caller outside chg_lens (the line that called ``fit_chg`` / ``fit_contrastive``, however
    many of the library's frames lie between)."""
    if message:
        import sys

        frame, level = sys._getframe(1), 2
        while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "chg_lens":
            frame, level = frame.f_back, level + 1
        warnings.warn(message, NotConvergedWarning, stacklevel=level)
