"""Causal Head Gating: fit G0, G+ and G- on a frozen model, and the result object.

Example::

    import chg_lens
    model = chg_lens.load_model("smollm2-135m-instruct")
    train, val = chg_lens.tasks.ioi(model, n_prompts=256)
    result = chg_lens.fit_chg(model, train, n_seeds=4, updates=100, reg_updates=100, validation=val)
    result.scores()            # one row per (seed, layer, head): scores and role
    result.save("runs/ioi")    # safetensors + JSON; CHGResult.load("runs/ioi") is exact
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from . import checks, deprecation, models, scoring, taxonomy
from . import diagnostics as diag
from .data import TaskDataset
from .deprecation import keyword_only
from .fitting import (SHARED_HELP, DataLoss, FitPlan, RunOptions, SettleRule, Stage, StageResult, StageSpec,
                      clipped_logit_mean, run_fit, uniform_gate_logits)
from .options import OptionSet, check_options, option, takes_options
from .scoring import evaluate
from .results import (Bundle, Result, check_config, check_fit_tensors, frame_from_json, frame_to_json, pack_stages,
                      require, require_fields, snapshots_frame, traces_frame, unpack_stages)

STAGES = ("g0", "g_plus", "g_minus")


class StageGates(Mapping):
    """A CHG result's gates by stage, read-only: ``result.gates["g0"]`` is ``sigmoid`` of that
    stage's logits, ``[n_seeds, n_layers, n_heads]``; iterates over the stages (``g0``, ``g_plus``,
    ``g_minus``).

    Calling it (``result.gates("g0")``, the method of earlier releases) still works for one release
    with a ``DeprecationWarning``.

    Example::

        result.gates["g_plus"].mean(0)        # [n_layers, n_heads]
        {stage: g.shape for stage, g in result.gates.items()}
    """

    def __init__(self, logits: Mapping[str, Tensor]):
        self._logits = logits

    def __getitem__(self, stage: str) -> Tensor:
        if stage not in self._logits:
            raise KeyError(f"no stage {stage!r}; the stages are {', '.join(map(repr, self._logits))}")
        return torch.sigmoid(self._logits[stage])

    def __iter__(self):
        return iter(self._logits)

    def __len__(self) -> int:
        return len(self._logits)

    def __call__(self, stage: str) -> Tensor:
        warnings.warn(f"result.gates({stage!r}) is now result.gates[{stage!r}] (gates is a read-only mapping by "
                      "stage); the call form goes away in the next release", DeprecationWarning, stacklevel=2)
        return self[stage]

    def __repr__(self) -> str:
        return f"StageGates({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self._logits.items())})"


@dataclass
class CHGConfig(OptionSet):
    """Every fitting option of :func:`fit_chg`, declared once (type, default, one-line help), with the
    paper's appendix defaults: what makes two fits the same fit (a result's ``config``, the
    checkpoint key). ``check()`` is the validation ``fit_chg``, :func:`check_fit_options`, sweeps,
    the command line and a loaded result all run."""

    n_seeds: int = option(10, SHARED_HELP["n_seeds"])
    updates: int = option(500, "Adam updates of G0 (lambda = 0); the maximum with stop_when_settled")
    reg_updates: int = option(500, "Adam updates of G+ and of G-; the maximum with stop_when_settled")
    batch_size: int = option(64, "rows per update")
    lam: float = option(0.1, "lambda >= 0: the weight of the clipped mean logit, pushing G+ toward 1 and G- toward 0")
    seed: int = option(0, SHARED_HELP["seed"])
    lr: float = option(0.1, "G0's learning rate at the start (linear decay to lr_end)")
    lr_end: float = option(0.01, "G0's learning rate at the last update")
    reg_lr: float = option(0.5, "G+/G-'s learning rate at the start (linear decay to reg_lr_end)")
    reg_lr_end: float = option(0.1, "G+/G-'s learning rate at the last update")
    clip: float = option(4.0, SHARED_HELP["clip"])
    grad_accum: int = option(1, SHARED_HELP["grad_accum"])
    joint: bool = option(True, "fit G+ and G- in the same passes (the same batches either way)")
    snapshot_every: int = option(10, SHARED_HELP["snapshot_every"])
    stop_when_settled: bool | diag.Thresholds = option(
        False, "end a stage once it settled (True, or a diagnostics.Thresholds to settle by); False: the full schedule")
    settle_thresholds: dict | None = option(
        None, "the diagnostics thresholds stop_when_settled used (None: the defaults)", parameter=False)

    def check(self) -> None:
        """Raise a ValueError naming the first bad option (see :mod:`chg_lens.checks`)."""
        for name in ("n_seeds", "updates", "reg_updates", "batch_size", "grad_accum", "snapshot_every"):
            checks.positive_int(name, getattr(self, name))
        checks.whole_int("seed", self.seed)
        if isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) and self.lam < 0:
            raise ValueError(
                f"lam must be >= 0 (got {self.lam}): its sign is set per stage, pushing G+ toward 1 "
                "and G- toward 0"
            )
        checks.finite_float("lam", self.lam, min=0)
        checks.finite_float("clip", self.clip, min=0, min_open=True)
        for name in ("lr", "reg_lr"):
            checks.finite_float(name, getattr(self, name), min=0, min_open=True)
        for name in ("lr_end", "reg_lr_end"):
            checks.finite_float(name, getattr(self, name), min=0)
        if not isinstance(self.joint, bool):
            raise ValueError(f"joint must be true or false; got {self.joint!r}")
        s = self.stop_when_settled
        if not isinstance(s, bool):
            if not isinstance(s, diag.Thresholds):
                raise TypeError(f"stop_when_settled must be True, False or a diagnostics.Thresholds; got {s!r}")
            s.check()

    def resolved(self) -> "CHGConfig":
        """Canonical values; a ``Thresholds`` given as ``stop_when_settled`` becomes
        ``stop_when_settled=True`` and its values in ``settle_thresholds`` (the config stays JSON)."""
        out = super().resolved()
        if isinstance(self.stop_when_settled, diag.Thresholds):
            out = replace(out, stop_when_settled=True, settle_thresholds=asdict(self.stop_when_settled))
        return out


@dataclass
class CHGRunOptions(RunOptions):
    """The run options of :func:`fit_chg` (not part of the fit's identity): those of every fit
    (:class:`chg_lens.fitting.RunOptions`), the validation data and the task's name."""

    validation: TaskDataset | None = option(
        None, "held-out rows: the ungated model, G0, G+ and G- of every seed are scored on them (the model's own dtype)")
    task: str | None = option(None, "the task's name in the result (default: the data's name)")

    def check(self) -> None:
        super().check()
        if self.validation is not None and not isinstance(self.validation, TaskDataset):
            raise TypeError(f"validation must be a TaskDataset or None; got {type(self.validation).__name__} "
                            "(a task returns (train, validation): pass the second)")
        if self.task is not None and not isinstance(self.task, str):
            raise ValueError(f"task must be a name (text) or None; got {self.task!r}")


FIT_OPTIONS = (CHGConfig, CHGRunOptions)
"""The option sets of :func:`fit_chg`: its keyword-only options are their fields."""


def check_fit_options(**options: Any) -> None:
    """Check every :func:`fit_chg` option given (a ValueError naming the first bad one), without a
    model or data: what ``fit_chg`` itself checks first (``CHGConfig.check``,
    ``CHGRunOptions.check``), and what a sweep checks before submitting.

    Example::

        check_fit_options(n_seeds=4, lam=0.1, checkpoint_every=25)
    """
    check_options(FIT_OPTIONS, options, "fit_chg", ignore=("model", "data"))


@dataclass
class CHGResult(Result):
    """Fitted gates of every seed, traces of the fit, and the metadata to reproduce it.

    ``g0``, ``g_plus``, ``g_minus`` (also ``gates["g0"]``, ...) are ``[n_seeds, n_layers, n_heads]``
    in [0, 1]; ``to_frame()`` is :meth:`scores`. ``save(path)`` writes ``tensors.safetensors``,
    ``meta.json`` and ``scores.csv``; ``CHGResult.load(path)`` (or ``chg_lens.load``) is exact.
    """

    kind = "chg"
    noun = "a CHG result"

    logits: dict[str, Float[Tensor, "seeds layer head"]]
    traces: dict[str, dict[str, Float[Tensor, "updates seeds"]]]
    snapshots: dict[str, Float[Tensor, "snaps seeds layer head"]]
    snapshot_steps: dict[str, Tensor]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    validation: pd.DataFrame | None = None

    @property
    def g0(self) -> Tensor:
        return torch.sigmoid(self.logits["g0"])

    @property
    def g_plus(self) -> Tensor:
        return torch.sigmoid(self.logits["g_plus"])

    @property
    def g_minus(self) -> Tensor:
        return torch.sigmoid(self.logits["g_minus"])

    @property
    def n_seeds(self) -> int:
        return int(self.logits["g0"].shape[0])

    @property
    def gates(self) -> "StageGates":
        """The fitted gates in [0, 1] by stage: ``result.gates["g_plus"]`` is ``[n_seeds, n_layers,
        n_heads]`` (the same as ``result.g_plus``); read-only. ``result.gates("g0")``, the method of
        earlier releases, still works for one release with a ``DeprecationWarning``."""
        return StageGates(self.logits)

    # ------------------------------------------------------------------ analysis
    def scores(self) -> pd.DataFrame:
        """One row per (seed, layer, head): ``g_plus``, ``g_minus``, the three scores and ``role``."""
        frame = taxonomy.scores_frame(self.g_plus, self.g_minus)
        frame.insert(0, "task", self.meta.get("task", "custom"))
        frame.insert(0, "model", self.meta.get("model", "model"))
        return frame

    def aggregate(self) -> pd.DataFrame:
        """Per head, "always" (min over seeds) and "any" (max over seeds) of each score."""
        return taxonomy.aggregate(self.scores())

    def percent_above(self, threshold: float = 0.5) -> pd.DataFrame:
        """The paper's Table 2 for this result: percent of heads with score >= threshold."""
        return taxonomy.percent_above(self.scores(), threshold)

    def trajectories(self) -> pd.DataFrame:
        """Gate snapshots as a long frame (stage, update, seed, layer, head, gate); G+/G- updates
        continue the count after G0's (the updates G0 took), as in the paper's Figure 1b."""
        g0_updates = self.updates_taken()["g0"]
        offset = {"g0": 0, "g_plus": g0_updates, "g_minus": g0_updates}
        return snapshots_frame({k: self.snapshots[k] for k in STAGES}, self.snapshot_steps, offset)

    def trace_frame(self) -> pd.DataFrame:
        """Per-update traces (nll, reg, loss) as a long frame: stage, update, seed, name, value."""
        return traces_frame(self.traces)

    # ------------------------------------------------------------------ diagnostics
    def updates_taken(self) -> dict[str, int]:
        """Updates each stage took (fewer than planned where ``stop_when_settled`` stopped it)."""
        return {k: int(next(iter(self.traces[k].values())).shape[0]) for k in STAGES}

    def seed_agreement(self) -> dict[str, float]:
        """How far the seeds agree: ``role_agreement`` (share of heads whose role is the same in
        every seed) and the mean pairwise Spearman correlation over heads of G+ (``spearman_g_plus``)
        and of G- (``spearman_g_minus``) between seeds. NaN with one seed."""
        role = taxonomy.roles(taxonomy.score_tensors(self.g_plus, self.g_minus))
        return {"role_agreement": diag.same_in_every_seed(role),
                "spearman_g_plus": diag.mean_pairwise_spearman(self.g_plus),
                "spearman_g_minus": diag.mean_pairwise_spearman(self.g_minus)}

    def diagnostics(self, **thresholds: Any) -> pd.DataFrame:
        """Convergence diagnostics: one row per (stage, seed).

        Columns: ``stage, seed, updates`` (taken), ``window`` (updates the movement is measured
        over: the last 10% of the stage's planned updates, at least 10), ``mean_abs_change`` and
        ``share_moving`` (gates that moved more than ``move``) over that window, ``nll_slope`` (per
        update, least squares over the window), ``nll_change`` and ``settled``; on G0 rows also
        ``val_logprob, val_accuracy, ungated_logprob, ungated_accuracy, kept_task`` (needs
        validation data; NaN otherwise). ``frame.attrs`` holds ``converged`` and the
        :meth:`seed_agreement` numbers. ``thresholds`` override :class:`chg_lens.diagnostics.Thresholds`
        (``window, min_window, move, max_moving, max_nll_drop, g0_logprob_tol, g0_accuracy_tol``;
        defaults: those the fit stopped with, if it was given a ``Thresholds``, else the module's);
        docs/diagnostics.md explains each number and what to do when one fails.

        Example::

            d = result.diagnostics()              # or result.diagnostics(move=0.02)
            d[~d.settled]                          # stages and seeds still moving
            d.attrs["converged"], d.attrs["role_agreement"]
        """
        th = diag.Thresholds.of(self.config.get("settle_thresholds"), **thresholds)
        planned = {"g0": self.config["updates"], "g_plus": self.config["reg_updates"],
                   "g_minus": self.config["reg_updates"]}
        frames = []
        for stage in STAGES:
            f = diag.stage_diagnostics(self.snapshots[stage], self.snapshot_steps[stage], self.traces[stage]["nll"],
                                       planned[stage], th)
            f.insert(0, "stage", stage)
            frames.append(f)
        frame = pd.concat(frames, ignore_index=True)
        cols = ["val_logprob", "val_accuracy", "ungated_logprob", "ungated_accuracy", "kept_task"]
        for c in cols:
            frame[c] = pd.Series([pd.NA] * len(frame), dtype="object") if c == "kept_task" else float("nan")
        if self.validation is not None:
            g0 = diag.g0_task_check(self.validation, th)
            rows = frame.index[frame.stage == "g0"]
            for c in cols:
                values = g0.set_index("seed")[c].reindex(frame.loc[rows, "seed"]).to_numpy()
                frame.loc[rows, c] = values if c != "kept_task" else [bool(v) for v in values]
        kept = frame.loc[frame.stage == "g0", "kept_task"]
        frame.attrs["converged"] = bool(frame.settled.all() and (kept.isna().all() or kept.astype(bool).all()))
        frame.attrs.update(self.seed_agreement())
        return frame

    @property
    def converged(self) -> bool:
        """Every stage of every seed settled and every G0 seed kept the task (default thresholds;
        without validation data G0 is not checked, and the summary says so)."""
        return self.diagnostics().attrs["converged"]

    def convergence_warning(self, **thresholds: Any) -> str:
        """The one-line warning of an unconverged fit (what failed, what to change); empty when converged."""
        th = diag.Thresholds.of(self.config.get("settle_thresholds"), **thresholds)
        return diag.advice(self.diagnostics(**thresholds), th)

    def summary(self) -> str:
        """A few lines: model, task, budget, final NLLs, validation, the share of each role, and
        the convergence diagnostics (with the warning when the fit did not converge)."""
        lines = [f"CHG on {self.meta.get('model')} / {self.meta.get('task')}: {self.n_seeds} seeds, "
                 f"{self.config['updates']} + {self.config['reg_updates']} updates, batch {self.config['batch_size']}, "
                 f"lambda {self.config['lam']}"]
        for stage in STAGES:
            nll = self.traces[stage].get("nll")
            if nll is not None:
                lines.append(f"  final NLL {stage:8s} mean over seeds {float(nll[-1].mean()):.4f}")
        if self.validation is not None:
            v = self.validation.groupby("gates", sort=False)[["logprob", "accuracy"]].mean()
            for name, row in v.iterrows():
                lines.append(f"  validation {name:8s} logprob {row.logprob:8.4f}  accuracy {row.accuracy:.3f}")
        pct = self.percent_above().iloc[0]
        lines.append("  heads with score >= 0.5 (always / any seed): " + ", ".join(
            f"{s} {pct['always_' + s]:.1f}% / {pct['any_' + s]:.1f}%" for s in taxonomy.SCORES))
        d = self.diagnostics()
        lines.append(f"  converged: {'yes' if d.attrs['converged'] else 'NO'}")
        lines += diag.describe(d, {k: d.attrs[k] for k in ("role_agreement", "spearman_g_plus", "spearman_g_minus")})
        if not d.attrs["converged"]:
            lines.append("  WARNING: " + diag.advice(d))
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return self.scores()

    def _html_body(self) -> str:
        """The notebook view's table (see :meth:`_repr_html_`): the role map of the seed-mean scores
        (F facilitating, I interfering, · irrelevant; a cell's tooltip has its scores)."""
        from . import display

        mean = {k: v.mean(dim=0) for k, v in taxonomy.score_tensors(self.g_plus, self.g_minus).items()}
        role = taxonomy.roles(mean)
        cells = []
        for layer in range(role.shape[0]):
            row = []
            for head in range(role.shape[1]):
                name = taxonomy.ROLES[taxonomy.SCORES[int(role[layer, head])]]
                text, bg = display.ROLE_STYLE[name]
                tip = f"L{layer}H{head} {name}: " + ", ".join(f"{s} {float(mean[s][layer, head]):.3f}"
                                                            for s in taxonomy.SCORES)
                row.append((text, bg, tip))
            cells.append(row)
        return display.grid(cells, caption="Role map (mean scores over seeds): F facilitating, I interfering, "
                                           "· irrelevant; rows are layers, columns heads")

    # ------------------------------------------------------------------ io
    def identity(self) -> dict[str, Any]:
        """What makes two CHG results the same fit: options, data, model and its weights
        (:func:`chg_lens.models.weights_fingerprint`)."""
        return {"config": self.config, "data": self.meta.get("data_fingerprint"), "model": self.meta.get("model"),
                "weights": self.meta.get("weights")}

    def _bundle(self) -> Bundle:
        scores = self.scores()
        return (pack_stages(self.logits, self.traces, self.snapshots, self.snapshot_steps),
                {"config": self.config, "meta": self.meta,
                 "validation": None if self.validation is None else frame_to_json(self.validation)},
                {"scores.csv": lambda p: scores.to_csv(p, index=False)})

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike) -> "CHGResult":
        require(tensors, [f"logits/{s}" for s in STAGES] + [f"snapshots/{s}" for s in STAGES]
                + [f"snapshot_steps/{s}" for s in STAGES], path, "CHG result")
        require_fields(meta, ["config", "meta"], path, cls.noun)
        check_config(meta["config"], CHGConfig, path)
        check_fit_tensors(tensors, STAGES, meta, path)
        logits, traces, snapshots, snapshot_steps = unpack_stages(tensors)
        val = meta.get("validation")
        return cls(
            logits=logits, traces=traces, snapshots=snapshots,
            snapshot_steps=snapshot_steps, config=meta["config"], meta=meta["meta"],
            validation=None if val is None else frame_from_json(val),
        )


def nll_loss(model: Any, data: TaskDataset, autocast: str | None = "auto") -> DataLoss:
    """CHG's data loss for the fitting loop: ``(gates, rows) -> (nll [configs], {"nll": nll})``,
    each configuration's NLL the mean over rows of the mean over their target tokens. The model and
    precision are checked once here; every update then runs the unchecked engine
    (:func:`chg_lens.scoring.row_logprobs_unchecked`)."""
    ctx = scoring.context(model, autocast=autocast)

    def data_loss(gates: Tensor, rows: Tensor):
        out = scoring.row_logprobs_unchecked(ctx, data.tokens[rows], data.loss_mask[rows], gates)
        return out.nll, {"nll": out.nll}

    return data_loss


@keyword_only("n_seeds", "updates", "reg_updates", "batch_size", "lam", "seed")
@takes_options(*FIT_OPTIONS)
def fit_chg(model: Any, data: TaskDataset, config: CHGConfig, run: CHGRunOptions) -> CHGResult:
    """Fit Causal Head Gating: G0 (lambda = 0), then G+ and G- from G0's logits.

    Gates are ``sigmoid(logits)``, logits initialised from U(0, 1) gates drawn from ``seed``. G0 runs
    ``updates`` Adam steps at a learning rate decaying linearly from ``lr`` to ``lr_end``; G+ and G-
    run ``reg_updates`` steps from ``reg_lr`` to ``reg_lr_end`` with ``lam * mean(clamp(logits,
    -clip, clip))`` subtracted from the loss for G+ (toward 1) and added for G- (toward 0). The NLL is
    the mean over target tokens of each row, then over rows. The ``n_seeds`` masks share every
    forward pass; with ``joint`` G+ and G- do too (the same batches either way). ``grad_accum``
    splits each batch into micro-batches with the same gradient; ``configs_per_pass`` runs at most
    that many gate configurations (seeds; 2 per seed in the joint G+/G- stage) per pass, also with
    the same gradient: both trade a little speed for memory. No gradient reaches the weights.

    With ``checkpoint_dir`` the fit writes its state every ``checkpoint_every`` updates and, when
    called again with the same arguments, resumes where it stopped.

    Precision follows the hardware: ``autocast="auto"`` (the default) runs the fit's passes in bf16
    mixed precision on CUDA devices with native bf16 and on CPUs where bf16 measured faster than
    float32, and in float32 elsewhere (:func:`chg_lens.models.auto_precision`); ``"bf16"``, ``"fp16"`` or ``"off"`` force
    a choice. Gates, the loss and Adam's state are float32 in every mode, and under autocast the
    frozen weights are cast once for the whole fit (:func:`chg_lens.models.cast_weights_once`).
    The ``validation`` pass always runs in float32, so its numbers compare across machines.
    ``result.meta["autocast"]`` and ``["precision"]`` record the choice; see benchmarks/README.md.

    Every fit keeps what its convergence diagnostics need (:meth:`CHGResult.diagnostics`, a
    snapshot where each stage's diagnostic window starts) and ends with a
    :class:`~chg_lens.diagnostics.NotConvergedWarning` when it did not converge. With
    ``stop_when_settled=True`` (or a :class:`~chg_lens.diagnostics.Thresholds`) a stage ends at the
    first update after which it has settled over its diagnostic window (every seed, the rule of
    :mod:`chg_lens.diagnostics`); ``updates`` and ``reg_updates`` are then the maximum and
    ``result.updates_taken()`` says what each stage took. The learning rate keeps its full-length
    linear decay (from ``lr`` toward ``lr_end`` over ``updates``), so a stage that stops early stops
    at a rate above ``lr_end``. The default (``False``) runs the paper's full schedule.

    The options are declared once, in :class:`CHGConfig` (the fit) and :class:`CHGRunOptions` (how it
    runs); the "Options" list below (in ``help()``) is generated from them.

    Example::

        result = fit_chg(model, train, n_seeds=10, validation=val)
        result.g_plus.shape       # [10, n_layers, n_heads]
        result.converged, result.diagnostics()
    """
    if not isinstance(data, TaskDataset):
        raise TypeError(f"data must be a TaskDataset; got {type(data).__name__} (a task returns (train, validation))")
    S, lam, clip = config.n_seeds, config.lam, config.clip
    th = diag.Thresholds.of(config.settle_thresholds)

    def plan(model: Any, autocast: str | None, L: int, H: int) -> FitPlan:
        def reg(sign: Tensor):
            def regularizer(logits: Tensor):
                r = clipped_logit_mean(logits, clip)
                return sign.to(r.device) * lam * r, {"reg": r}
            return regularizer

        w0 = diag.window_length(config.updates, th.window, th.min_window)
        wr = diag.window_length(config.reg_updates, th.window, th.min_window)
        rule = lambda w: SettleRule(w, th, "nll") if config.stop_when_settled else None
        plus, minus = -torch.ones(S), torch.ones(S)
        g0 = Stage("g0", config.updates, config.lr, config.lr_end)
        specs = [StageSpec(g0, lambda done: uniform_gate_logits((S, L, H), config.seed), window=w0, settle=rule(w0))]
        reg_stage = lambda name: Stage(name, config.reg_updates, config.reg_lr, config.reg_lr_end, batch_key="reg")
        if config.joint:
            specs.append(StageSpec(reg_stage("g_pm"), lambda done: done["g0"].logits.repeat(2, 1, 1),
                                   reg(torch.cat([plus, minus])), window=wr, settle=rule(wr)))
        else:
            for name, sign in (("g_plus", plus), ("g_minus", minus)):
                specs.append(StageSpec(reg_stage(name), lambda done: done["g0"].logits, reg(sign), window=wr,
                                       settle=rule(wr)))
        return FitPlan(specs, nll_loss(model, data, autocast), len(data), {"data": data.fingerprint()})

    def result(done: dict[str, StageResult], meta: dict[str, Any]) -> CHGResult:
        stages = _split_joint(done, S) if config.joint else done
        meta.update(task=run.task or data.name, n_train=len(data), data_fingerprint=data.fingerprint(),
                    seconds={k: v.seconds for k, v in stages.items()},
                    updates_taken={k: v.updates for k, v in stages.items()})
        return CHGResult(
            logits={k: stages[k].logits for k in STAGES},
            traces={k: stages[k].traces for k in STAGES},
            snapshots={k: stages[k].snapshots for k in STAGES},
            snapshot_steps={k: stages[k].snapshot_steps for k in STAGES},
            config=asdict(config), meta=meta,
        )

    def validated(model: Any, result: CHGResult) -> None:
        result.validation = validate(model, run.validation, result)
        result.meta["n_validation"] = len(run.validation)
        result.meta["validation_precision"] = "float32"

    datasets = [data] + ([run.validation] if run.validation is not None else [])
    return run_fit(model, config, run, datasets, plan, result, validated if run.validation is not None else None)


@keyword_only("batch_size", "autocast")
def validate(model: Any, data: TaskDataset, result: CHGResult, *, batch_size: int = 32,
             autocast: str | None = "off") -> pd.DataFrame:
    """Target log-probability (summed over each row's targets, mean over rows) and accuracy (all
    targets argmax-correct) for the ungated model and for G0, G+ and G- of every seed.

    Model, data, then the result, as in :func:`chg_lens.ablation.figure2`; the old order
    ``validate(model, result, data)`` still works for one release with a ``DeprecationWarning``.
    Full precision by default (``autocast="off"``): one forward pass, a small share of a fit's
    time, and numbers that do not depend on the machine's bf16 support.

    Example::

        chg_lens.validate(model, val, result).groupby("gates").accuracy.mean()
    """
    if isinstance(data, CHGResult) and isinstance(result, TaskDataset):
        deprecation.warn("validate(model, result, data) is now validate(model, data, result), the order of "
                         "figure2; the old order goes away in the next release", depth=1)
        data, result = result, data
    if not isinstance(data, TaskDataset) or not isinstance(result, CHGResult):
        raise TypeError(f"validate(model, data, result) takes a TaskDataset and a CHGResult; got "
                        f"{type(data).__name__} and {type(result).__name__}")
    model = models.as_model(model)
    S = result.n_seeds
    configs = torch.cat([torch.ones(1, *result.g0.shape[1:]), result.g0, result.g_plus, result.g_minus])
    scores = evaluate(model, data, configs, batch_size=batch_size, autocast=autocast)
    labels = [("none", -1)] + [(stage, s) for stage in STAGES for s in range(S)]
    return pd.DataFrame({
        "gates": [l for l, _ in labels], "seed": [s for _, s in labels],
        "logprob": scores.logprob_sum.mean(dim=1).double().numpy(),
        "accuracy": scores.correct.float().mean(dim=1).double().numpy(),
    })


def _split_joint(done: dict[str, StageResult], S: int) -> dict[str, StageResult]:
    pm = done["g_pm"]
    out = {"g0": done["g0"]}
    for name, part in (("g_plus", slice(0, S)), ("g_minus", slice(S, 2 * S))):
        out[name] = StageResult(
            logits=pm.logits[part], traces={k: v[:, part] for k, v in pm.traces.items()},
            snapshots=pm.snapshots[:, part], snapshot_steps=pm.snapshot_steps, seconds=pm.seconds,
            updates=pm.updates,
        )
    return out
