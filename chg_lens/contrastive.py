"""Contrastive Causal Head Gating (paper section 4.4, Eq. 2): one gate matrix that keeps a task in
one formulation (retain) and removes it in a matched one (forget), so the heads it switches off are
those that only the forgotten formulation needs.

Example::

    import chg_lens
    from chg_lens.contrastive import fit_contrastive, evaluate_contrastive
    from chg_lens.tasks.function_vectors import fv_formats
    model = chg_lens.load_model("smollm2-135m-instruct")
    f = fv_formats(model, "antonym", n_prompts=64, data_dir="../shared/data/function_vectors")
    result = fit_contrastive(model, retain=f["instruction"], forget=f["icl"], updates=100, batch_size=16)
    result.gates_frame().query("off")          # heads switched off
    evaluate_contrastive(model, result, f["instruction"], f["icl"])   # accuracy / logprob with 95% CIs
    result.save("runs/antonym_forget_icl")     # ContrastiveResult.load(...) is exact

The paper's Figure 5 (six function-vector tasks, one held out at a time, both directions) is built
from these pieces in ``experiments/_figure5.py`` (``python experiments/figure5_contrastive.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from . import checks, deprecation, models
from . import diagnostics as diag
from .chg import CHGResult
from .data import TaskDataset
from .deprecation import keyword_only, renamed
from .fitting import (SHARED_HELP, FitPlan, RunOptions, Stage, StageResult, StageSpec, clipped_logit_mean, run_fit,
                      uniform_gate_logits)
from .options import OptionSet, option, takes_options
from .scoring import Context, context, evaluate, row_logprobs_unchecked
from .results import (Bundle, Result, check_config, check_fit_tensors, frame_from_json, frame_to_json, pack_stages,
                      require, require_fields, snapshots_frame, traces_frame, unpack_stages)
from .stats import t_interval, wilson_interval

STAGE = "contrast"


@dataclass
class ContrastiveConfig(OptionSet):
    """Every fitting option of :func:`fit_contrastive`, declared once (type, default, one-line help),
    with the paper's appendix defaults (section 6.2): what makes two fits the same fit."""

    n_seeds: int = option(1, SHARED_HELP["n_seeds"])
    updates: int = option(500, "Adam updates")
    batch_size: int = option(64, "matched row pairs per update")
    lam: float = option(0.1, "lambda >= 0: the weight of the clipped mean logit, pulling every gate toward 1")
    max_diff: float = option(5.0, "the forget term stops pushing once the forget log-prob is this far (nats) below "
                                  "the retain log-prob")
    lr: float = option(0.1, "learning rate at the start (linear decay to lr_end)")
    lr_end: float = option(0.01, "learning rate at the last update")
    clip: float = option(4.0, SHARED_HELP["clip"])
    seed: int = option(0, SHARED_HELP["seed"])
    grad_accum: int = option(1, SHARED_HELP["grad_accum"])
    snapshot_every: int = option(10, SHARED_HELP["snapshot_every"])

    def check(self) -> None:
        """Raise a ValueError naming the first bad option; ``lam`` follows CHG's rule (finite, >= 0:
        it pulls every gate toward 1)."""
        for name in ("n_seeds", "updates", "batch_size", "grad_accum", "snapshot_every"):
            checks.positive_int(name, getattr(self, name))
        checks.whole_int("seed", self.seed)
        if isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) and self.lam < 0:
            raise ValueError(f"lam must be >= 0 (got {self.lam}): it pulls every gate toward 1, so only heads the "
                             "forget term needs gone are switched off")
        checks.finite_float("lam", self.lam, min=0)
        for name in ("max_diff", "clip", "lr"):
            checks.finite_float(name, getattr(self, name), min=0, min_open=True)
        checks.finite_float("lr_end", self.lr_end, min=0)


@dataclass
class ContrastiveRunOptions(RunOptions):
    """The run options of :func:`fit_contrastive` (not part of the fit's identity): those of every
    fit (:class:`chg_lens.fitting.RunOptions`), how the rows share a pass, the pairing check and the
    validation pair."""

    one_pass: bool | None = option(
        None, "retain and forget rows in one forward pass (None: when their widths are close, padding <= 25%)")
    check_pairs: bool = option(True, "check that row i of retain and forget is the same problem (check_matched)")
    validation: tuple[TaskDataset, TaskDataset] | None = option(
        None, "(retain_eval, forget_eval), matched: evaluate_contrastive on them is attached (the model's own dtype)")

    def check(self) -> None:
        super().check()
        if self.one_pass is not None and not isinstance(self.one_pass, bool):
            raise ValueError(f"one_pass must be true, false or None (decide by the rows' widths); got {self.one_pass!r}")
        if not isinstance(self.check_pairs, bool):
            raise ValueError(f"check_pairs must be true or false; got {self.check_pairs!r}")
        if self.validation is not None:
            check_validation(self.validation)

    def resolved(self) -> "ContrastiveRunOptions":
        out = super().resolved()
        return out if self.validation is None else replace(out, validation=tuple(self.validation))


FIT_OPTIONS = (ContrastiveConfig, ContrastiveRunOptions)
"""The option sets of :func:`fit_contrastive`: its keyword-only options are their fields."""


# --------------------------------------------------------------------------------------------- pairing
def _targets(data: TaskDataset) -> list[tuple[int, ...]]:
    return [tuple(row[m].tolist()) for row, m in zip(data.tokens, data.loss_mask)]


def check_matched(retain: TaskDataset, forget: TaskDataset, *, names: tuple[str, str] = ("retain", "forget")) -> None:
    """Raise ``ValueError`` unless row ``i`` of ``retain`` and ``forget`` can be the same problem.

    Sizes must be equal. When both carry ``row_meta["pair_id"]`` the ids must agree row by row.
    Otherwise, when both hold the same target sequences, they must come in the same order (the
    same targets in another order means the rows were shuffled apart). Data sets whose targets
    differ by design (a contrast of outputs) are accepted on size alone. ``names`` are the two data
    sets' names in the messages (e.g. ``("validation retain", "validation forget")``).

    Example::

        check_matched(f["instruction"], f["icl"])
    """
    a_name, b_name = names
    for name, d in ((a_name, retain), (b_name, forget)):
        if not isinstance(d, TaskDataset):
            raise TypeError(f"{name} must be a TaskDataset; got {type(d).__name__} "
                            "(a registered task returns (train, validation): pass one of them)")
    if len(retain) != len(forget):
        raise ValueError(
            f"{a_name} has {len(retain)} rows but {b_name} has {len(forget)}: contrastive CHG needs matched rows "
            "(row i of both = the same problem in two formulations); build both from the same problems, e.g. "
            "chg_lens.tasks.function_vectors.fv_formats, and split them with the same seed")
    a, b = retain.row_meta.get("pair_id"), forget.row_meta.get("pair_id")
    if a is not None and b is not None:
        bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if bad:
            i = bad[0]
            raise ValueError(f"{len(bad)} of {len(a)} rows of {a_name} and {b_name} are not paired: row_meta['pair_id'] "
                             f"differs (first: row {i}, {a[i]!r} vs {b[i]!r}); order both data sets so row i is the "
                             "same problem")
        return
    ta, tb = _targets(retain), _targets(forget)
    if ta != tb and sorted(ta) == sorted(tb):
        bad = sum(x != y for x, y in zip(ta, tb))
        first = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
        raise ValueError(
            f"{a_name} and {b_name} hold the same targets but {bad} of {len(ta)} rows are not in the same order "
            f"(first: row {first}): the rows are not paired; order both data sets so row i is the same problem, "
            "or give both a row_meta['pair_id']")


def check_validation(validation: Any, name: str = "validation") -> tuple[TaskDataset, TaskDataset]:
    """``validation`` as a matched pair ``(retain_eval, forget_eval)``, else a TypeError (not a pair
    of data sets, or the ``(train, validation)`` split of one data set) or a ValueError from
    :func:`check_matched` that names the validation sets.

    Example::

        check_validation((f["instruction"].split(0.2, 0).validation, f["icl"].split(0.2, 0).validation))
    """
    from .data import TaskSplits

    if isinstance(validation, TaskSplits):
        raise TypeError(f"{name} must be (retain_eval, forget_eval), the held-out rows of both formulations matched "
                        "row by row; got the (train, validation) split of one data set: split retain and forget with "
                        "the same seed and pass (retain_split.validation, forget_split.validation)")
    if not isinstance(validation, (tuple, list)) or len(validation) != 2:
        got = type(validation).__name__ + (f" of {len(validation)}" if isinstance(validation, (tuple, list)) else "")
        raise TypeError(f"{name} must be a pair (retain_eval, forget_eval) of TaskDatasets; got {got}")
    check_matched(*validation, names=(f"{name} retain (first)", f"{name} forget (second)"))
    return validation[0], validation[1]


# --------------------------------------------------------------------------------------------- result
@dataclass
class ContrastiveResult(Result):
    """Fitted contrastive gates of every seed, per-update traces and the metadata to reproduce them.

    ``logits`` is ``[n_seeds, n_layers, n_heads]``; ``traces`` maps ``retain_nll``, ``forget_nll``,
    ``forget_term``, ``reg`` and ``loss`` to ``[updates, n_seeds]``; ``validation`` (when fitted with
    ``validation=(retain_eval, forget_eval)``) is the frame of :func:`evaluate_contrastive`
    (``evaluation``, its old name, still reads it for one release with a ``DeprecationWarning``).
    ``save(path)`` writes ``tensors.safetensors``, ``meta.json``, ``gates.csv`` (and
    ``validation.csv`` when validated);
    ``ContrastiveResult.load(path)`` (or ``chg_lens.load``) is exact.
    """

    kind = "contrastive"
    noun = "a contrastive CHG result"
    logits: Float[Tensor, "seeds layer head"]
    traces: dict[str, Float[Tensor, "updates seeds"]]
    snapshots: Float[Tensor, "snaps seeds layer head"]
    snapshot_steps: Tensor
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    validation: pd.DataFrame | None = None

    @property
    def evaluation(self) -> pd.DataFrame | None:
        """Deprecated: the old name of :attr:`validation` (one release)."""
        deprecation.warn("ContrastiveResult.evaluation is now .validation", depth=1)
        return self.validation

    @evaluation.setter
    def evaluation(self, frame: pd.DataFrame | None) -> None:
        deprecation.warn("ContrastiveResult.evaluation is now .validation", depth=1)
        self.validation = frame

    @property
    def gates(self) -> Float[Tensor, "seeds layer head"]:
        """The fitted gates in [0, 1]."""
        return torch.sigmoid(self.logits)

    @property
    def n_seeds(self) -> int:
        return int(self.logits.shape[0])

    def gate_matrix(self) -> Float[Tensor, "layer head"]:
        """Gates averaged over seeds, ``[n_layers, n_heads]``."""
        return self.gates.mean(dim=0)

    def off_heads(self, threshold: float = 0.5) -> list[tuple[int, int]]:
        """Heads whose seed-averaged gate is below ``threshold``: what only the forgotten variant needs."""
        return [tuple(x) for x in (self.gate_matrix() < threshold).nonzero().tolist()]

    def gates_frame(self, threshold: float = 0.5) -> pd.DataFrame:
        """One row per (seed, layer, head): ``gate`` and ``off`` (gate < threshold)."""
        g = self.gates
        idx = torch.cartesian_prod(*(torch.arange(n) for n in g.shape))
        frame = pd.DataFrame({"seed": idx[:, 0].numpy(), "layer": idx[:, 1].numpy(), "head": idx[:, 2].numpy(),
                              "gate": g.flatten().double().numpy()})
        frame["off"] = frame["gate"] < threshold
        return frame

    def trace_frame(self) -> pd.DataFrame:
        """Per-update traces as a long frame: stage, update, seed, name, value."""
        return traces_frame({STAGE: self.traces})

    def trajectories(self) -> pd.DataFrame:
        """Gate snapshots as a long frame: stage, update, seed, layer, head, gate."""
        return snapshots_frame({STAGE: self.snapshots}, {STAGE: self.snapshot_steps})

    def seed_agreement(self) -> dict[str, float]:
        """``off_agreement`` (share of heads switched off, or kept, in every seed) and
        ``spearman_gates`` (mean pairwise Spearman correlation of the gates between seeds); NaN with one seed."""
        return {"off_agreement": diag.same_in_every_seed(self.gates < 0.5),
                "spearman_gates": diag.mean_pairwise_spearman(self.gates)}

    def diagnostics(self, **thresholds: Any) -> pd.DataFrame:
        """Convergence diagnostics, one row per seed, as :meth:`chg_lens.CHGResult.diagnostics`
        (stage ``contrast``); the slope is that of the contrastive ``loss`` trace. There is no G0 here,
        so ``converged`` (in ``frame.attrs``, with :meth:`seed_agreement`) means every seed settled.

        Example: ``result.diagnostics().attrs["converged"]``.
        """
        th = diag.Thresholds.of(**thresholds)
        frame = diag.stage_diagnostics(self.snapshots, self.snapshot_steps, self.traces["loss"],
                                       self.config["updates"], th)
        frame.insert(0, "stage", STAGE)
        frame.attrs["converged"] = bool(frame.settled.all())
        frame.attrs.update(self.seed_agreement())
        return frame

    @property
    def converged(self) -> bool:
        """Every seed settled (default thresholds of :class:`chg_lens.diagnostics.Thresholds`)."""
        return self.diagnostics().attrs["converged"]

    def convergence_warning(self, **thresholds: Any) -> str:
        """The one-line warning of an unconverged fit; empty when converged."""
        return diag.advice(self.diagnostics(**thresholds), diag.Thresholds.of(**thresholds), kind="contrastive CHG")

    def summary(self) -> str:
        t = self.traces
        lines = [f"contrastive CHG on {self.meta.get('model')}: retain {self.meta.get('retain')}, forget "
                 f"{self.meta.get('forget')}; {self.n_seeds} seed(s), {self.config['updates']} updates, "
                 f"batch {self.config['batch_size']}, lambda {self.config['lam']}",
                 f"  final retain NLL {float(t['retain_nll'][-1].mean()):.4f}, forget NLL "
                 f"{float(t['forget_nll'][-1].mean()):.4f} (first update: {float(t['retain_nll'][0].mean()):.4f}, "
                 f"{float(t['forget_nll'][0].mean()):.4f})",
                 f"  heads off (mean gate < 0.5): {len(self.off_heads())} of {self.logits[0].numel()}: "
                 + ", ".join(f"L{l}H{h}" for l, h in self.off_heads()[:20])
                 + (" ..." if len(self.off_heads()) > 20 else "")]
        if self.validation is not None:
            e = self.validation.groupby(["variant", "gates"], sort=False)[["accuracy", "logprob"]].mean()
            for (variant, gates), row in e.iterrows():
                lines.append(f"  {variant:7s} {gates:8s} accuracy {row.accuracy:.3f}  logprob {row.logprob:8.4f}")
        d = self.diagnostics()
        lines.append(f"  converged: {'yes' if d.attrs['converged'] else 'NO'}")
        lines += diag.describe(d, {k: d.attrs[k] for k in ("off_agreement", "spearman_gates")})
        if not d.attrs["converged"]:
            lines.append("  WARNING: " + self.convergence_warning())
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return self.gates_frame()

    def _html_body(self) -> str:
        """The notebook view's table (see :meth:`_repr_html_`): the seed-mean gate of every head,
        the heads switched off (gate < 0.5) marked; then the validation table when there is one."""
        from . import display

        g = self.gate_matrix()
        cells = [[("×", display.RED, f"L{l}H{h} gate {float(g[l, h]):.3f} (off)") if float(g[l, h]) < 0.5 else
                  ("·", display.GREY, f"L{l}H{h} gate {float(g[l, h]):.3f}") for h in range(g.shape[1])]
                 for l in range(g.shape[0])]
        body = display.grid(cells, caption="Heads switched off (× : mean gate over seeds < 0.5); rows are layers, "
                                           "columns heads")
        if self.validation is not None:
            body += display.table(self.validation, max_rows=12, caption="Validation")
        return body

    # ------------------------------------------------------------------ io
    def identity(self) -> dict[str, Any]:
        """What makes two contrastive results the same fit: options, data, model and its weights."""
        return {"config": self.config, "model": self.meta.get("model"), "weights": self.meta.get("weights"),
                "retain": self.meta.get("retain_fingerprint"), "forget": self.meta.get("forget_fingerprint")}

    def _bundle(self) -> Bundle:
        gates, ev = self.gates_frame(), self.validation
        files = {"gates.csv": lambda p: gates.to_csv(p, index=False)}
        if ev is not None:
            files["validation.csv"] = lambda p: ev.to_csv(p, index=False)
        return (pack_stages({STAGE: self.logits}, {STAGE: self.traces}, {STAGE: self.snapshots},
                            {STAGE: self.snapshot_steps}),
                {"config": self.config, "meta": self.meta,
                 "validation": None if ev is None else frame_to_json(ev)},
                files)

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                     path: str | os.PathLike) -> "ContrastiveResult":
        require(tensors, [f"logits/{STAGE}", f"snapshots/{STAGE}", f"snapshot_steps/{STAGE}"], path,
                "contrastive CHG result")
        require_fields(meta, ["config", "meta"], path, cls.noun)
        check_config(meta["config"], ContrastiveConfig, path)
        check_fit_tensors(tensors, (STAGE,), meta, path)
        logits, traces, snapshots, steps = unpack_stages(tensors)
        ev = meta.get("validation", meta.get("evaluation"))  # "evaluation": saved before the rename
        inner = dict(meta["meta"])
        for old, new in (("n_eval", "n_validation"), ("eval_fingerprints", "validation_fingerprints")):
            if old in inner:
                inner.setdefault(new, inner.pop(old))
        return cls(logits=logits[STAGE], traces=traces[STAGE], snapshots=snapshots[STAGE],
                   snapshot_steps=steps[STAGE], config=meta["config"], meta=inner,
                   validation=None if ev is None else frame_from_json(ev))


# --------------------------------------------------------------------------------------------- fitting
def _pair_scores(model, retain: TaskDataset, forget: TaskDataset, rows: Tensor, gates: Tensor,
                 one_pass: bool | None, autocast: str | None = "auto") -> tuple[Tensor, Tensor]:
    """Summed target log-probs ``[configs, rows]`` of the retain and forget rows ``rows``.

    One forward pass over both row sets when their widths are close (padding waste <= 25%, or
    ``one_pass=True``), else two passes. ``model`` may be a :class:`chg_lens.scoring.Context` already
    checked (what the fit passes every update), else it is checked here."""
    ctx = model if isinstance(model, Context) else context(model, autocast=autocast)

    def trim(d: TaskDataset):
        m = d.loss_mask[rows]
        w = int(m.any(dim=0).nonzero().max()) + 1
        return d.tokens[rows, :w], m[:, :w]

    (tr, mr), (tf, mf) = trim(retain), trim(forget)
    wr, wf = tr.shape[1], tf.shape[1]
    if one_pass is None:
        one_pass = 2 * max(wr, wf) <= 1.25 * (wr + wf)
    if not one_pass:
        return (row_logprobs_unchecked(ctx, tr, mr, gates).logprob_sum,
                row_logprobs_unchecked(ctx, tf, mf, gates).logprob_sum)
    w = max(wr, wf)
    grow = lambda t, fill: torch.nn.functional.pad(t, (0, w - t.shape[1]), value=fill)
    tokens = torch.cat([grow(tr, retain.pad_token_id), grow(tf, forget.pad_token_id)])
    mask = torch.cat([grow(mr, False), grow(mf, False)])
    lp = row_logprobs_unchecked(ctx, tokens, mask, gates).logprob_sum
    return lp[:, : len(rows)], lp[:, len(rows):]


@keyword_only("n_seeds", "updates", "batch_size", "lam", "max_diff", "lr", "lr_end", "clip", "seed")
@renamed(evaluate_on="validation")
@takes_options(*FIT_OPTIONS)
def fit_contrastive(model: Any, retain: TaskDataset, forget: TaskDataset, config: ContrastiveConfig,
                    run: ContrastiveRunOptions) -> ContrastiveResult:
    """Fit contrastive CHG: keep ``retain``, remove ``forget`` (rows matched one to one).

    Loss per matched pair ``i`` (mean over the batch), per seed::

        -logp_retain[i] + clamp(logp_forget[i] - logp_retain[i].detach(), min=-max_diff)
        - lam * mean(clamp(logits, -clip, clip))

    ``logp`` is the **summed** log-probability of the row's target tokens, ``log P(y | x)`` of the
    whole target sequence as in the paper's Eq. 2 (not CHG's per-token mean): the contrast compares
    the probability of producing the answer, which for a multi-token answer is the product over its
    tokens, and ``max_diff`` bounds that difference in nats. Once the forget log-prob is
    ``max_diff`` below the retain log-prob the forget term stops pushing. ``lam > 0`` pulls every
    gate toward 1, so only heads the forget term needs gone are switched off.

    A single stage from U(0, 1) gates (``seed``), ``updates`` Adam steps with the learning rate
    decaying linearly from ``lr`` to ``lr_end``; the ``n_seeds`` masks are batched as configurations
    of one forward pass, and retain and forget rows share that pass when their widths allow
    (``one_pass``); ``configs_per_pass`` caps the masks per pass (the same gradient, less memory).
    ``validation=(retain_eval, forget_eval)`` (formerly ``evaluate_on``, still accepted for one
    release with a ``DeprecationWarning``) attaches :func:`evaluate_contrastive` (float32). With
    ``checkpoint_dir`` the fit resumes where it stopped. ``autocast`` as in
    :func:`chg_lens.chg.fit_chg` (default ``"auto"``: bf16 where the hardware has it natively).

    The options are declared once, in :class:`ContrastiveConfig` (the fit) and
    :class:`ContrastiveRunOptions` (how it runs); the "Options" list below (in ``help()``) is generated from them.

    Example::

        result = fit_contrastive(model, f["instruction"], f["icl"], n_seeds=2, updates=200)
        result.gates.shape        # [2, n_layers, n_heads]
    """
    if run.check_pairs:
        check_matched(retain, forget)
    else:
        for name, d in (("retain", retain), ("forget", forget)):
            if not isinstance(d, TaskDataset):
                raise TypeError(f"{name} must be a TaskDataset; got {type(d).__name__}")
        if len(retain) != len(forget):
            raise ValueError(f"retain has {len(retain)} rows but forget has {len(forget)}: rows must be matched")
    S, lam, clip, max_diff = config.n_seeds, config.lam, config.clip, config.max_diff

    def plan(model: Any, autocast: str | None, L: int, H: int) -> FitPlan:
        ctx = context(model, autocast=autocast)  # checked once; every update runs the unchecked engine

        def data_loss(gates: Tensor, rows: Tensor):
            lr_, lf = _pair_scores(ctx, retain, forget, rows, gates, run.one_pass)
            forget_term = (lf - lr_.detach()).clamp(min=-max_diff)
            loss = (-lr_ + forget_term).mean(dim=1)
            return loss, {"retain_nll": -lr_.mean(dim=1), "forget_nll": -lf.mean(dim=1),
                          "forget_term": forget_term.mean(dim=1)}

        def regularizer(logits: Tensor):
            r = clipped_logit_mean(logits, clip)
            return -lam * r, {"reg": r}

        spec = StageSpec(Stage(STAGE, config.updates, config.lr, config.lr_end),
                         lambda done: uniform_gate_logits((S, L, H), config.seed), regularizer,
                         window=diag.window_length(config.updates))
        return FitPlan([spec], data_loss, len(retain), {"kind": "contrastive", "retain": retain.fingerprint(),
                                                         "forget": forget.fingerprint()})

    def result(done: dict[str, StageResult], meta: dict[str, Any]) -> ContrastiveResult:
        r = done[STAGE]
        meta.update(retain=retain.name, forget=forget.name, retain_format=_format_of(retain),
                    forget_format=_format_of(forget), n_train=len(retain), logprob="sum over target tokens",
                    retain_fingerprint=retain.fingerprint(), forget_fingerprint=forget.fingerprint(), seconds=r.seconds)
        return ContrastiveResult(r.logits, r.traces, r.snapshots, r.snapshot_steps, asdict(config), meta)

    def validated(model: Any, result: ContrastiveResult) -> None:
        result.validation = evaluate_contrastive(model, result, *run.validation)
        result.meta["n_validation"] = len(run.validation[0])
        result.meta["validation_fingerprints"] = [d.fingerprint() for d in run.validation]

    datasets = [retain, forget, *(run.validation or ())]
    return run_fit(model, config, run, datasets, plan, result, validated if run.validation is not None else None)


# --------------------------------------------------------------------------------------------- evaluation
def _format_of(data: TaskDataset) -> str:
    return str(data.meta.get("fmt", data.name))


@keyword_only("batch_size", "level", "autocast")
def evaluate_contrastive(
    model: Any,
    gates: ContrastiveResult | Tensor,
    retain: TaskDataset,
    forget: TaskDataset,
    *,
    batch_size: int = 32,
    level: float = 0.95,
    autocast: str | None = "off",
) -> pd.DataFrame:
    """Accuracy and target log-prob of both variants, ungated ("default") and with each seed's gates
    ("gated"), with ``level`` confidence intervals.

    Accuracy is the share of rows whose every target token is the argmax (Wilson interval); logprob
    is the mean over rows of the summed target log-probability (Student's t interval). Columns:
    variant (retain|forget), format, gates (default|gated), seed (-1 for default), accuracy,
    accuracy_lo, accuracy_hi, logprob, logprob_lo, logprob_hi, n. Full precision by default
    (``autocast="off"``), so the numbers do not depend on the machine's bf16 support.

    Example::

        evaluate_contrastive(model, result, f["instruction"], f["icl"])
    """
    model = models.as_model(model)
    shape = (models.n_layers(model), models.n_heads(model))
    g = gates.gates if isinstance(gates, ContrastiveResult) else checks.gate_tensor("gates", gates, shape, trailing=True)
    if g.ndim == 2:
        g = g.unsqueeze(0)
    checks.gate_tensor("gates", g, shape, trailing=True)
    configs = torch.cat([torch.ones(1, *g.shape[1:]), g.detach().float().cpu()])
    rows = []
    for variant, data in (("retain", retain), ("forget", forget)):
        scores = evaluate(model, data, configs, batch_size=batch_size, autocast=autocast)
        for k in range(configs.shape[0]):
            rows.append({"variant": variant, "format": _format_of(data), "gates": "default" if k == 0 else "gated",
                         "seed": k - 1, **ci_row(scores.correct[k].tolist(), scores.logprob_sum[k].tolist(), level)})
    return pd.DataFrame(rows)


def ci_row(correct: Sequence[bool], logprob: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """accuracy, accuracy_lo/hi (Wilson), logprob, logprob_lo/hi (t) and n of one set of rows."""
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(k, n, level)
    m, mlo, mhi = t_interval(logprob, level)
    return {"accuracy": k / n if n else float("nan"), "accuracy_lo": lo, "accuracy_hi": hi,
            "logprob": m, "logprob_lo": mlo, "logprob_hi": mhi, "n": n}


# --------------------------------------------------------------------------------------------- overlap
def facilitating_heads(chg: CHGResult, threshold: float = 0.5, mode: str = "always") -> set[tuple[int, int]]:
    """Heads whose facilitation score (G-) is >= ``threshold`` in every seed (``always``) or any seed."""
    if mode not in ("always", "any"):
        raise ValueError(f"mode must be 'always' or 'any'; got {mode!r}")
    agg = chg.aggregate()
    keep = agg[agg[f"{mode}_facilitation"] >= threshold]
    return {(int(l), int(h)) for l, h in zip(keep["layer"], keep["head"])}


def facilitation_overlap(
    result: ContrastiveResult,
    chg: Mapping[str, CHGResult],
    threshold: float = 0.5,
    mode: str = "always",
) -> pd.DataFrame:
    """Overlap of the heads contrastive CHG switched off with each variant's facilitating heads.

    ``chg`` maps a variant name (e.g. ``{"retain": chg_on_instruction, "forget": chg_on_icl}``) to a
    plain CHG result on that variant. One row per variant: n_off, n_facilitating, n_both, jaccard
    (|both| / |union|), share_of_off (|both| / n_off) and the shared heads as ``"L.H"`` text.
    Heads switched off should be facilitating for the forget variant and not for the retain one.

    Example::

        facilitation_overlap(result, {"retain": fit_chg(model, instr), "forget": fit_chg(model, icl)})
    """
    off = set(result.off_heads(threshold))
    rows = []
    for variant, r in chg.items():
        shape = (r.meta.get("n_layers"), r.meta.get("n_heads"))
        if None not in shape and tuple(shape) != tuple(result.logits.shape[1:]):
            raise ValueError(f"CHG result '{variant}' is for a {shape} model; the contrastive gates are "
                             f"{tuple(result.logits.shape[1:])}")
        fac = facilitating_heads(r, threshold, mode)
        both, union = off & fac, off | fac
        rows.append({"variant": variant, "n_off": len(off), "n_facilitating": len(fac), "n_both": len(both),
                     "jaccard": len(both) / len(union) if union else float("nan"),
                     "share_of_off": len(both) / len(off) if off else float("nan"),
                     "both": ",".join(f"{l}.{h}" for l, h in sorted(both))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- files
def load_pairs_file(model: Any, path: str | os.PathLike, name: str | None = None) -> TaskDataset:
    """Rows of a .json/.jsonl/.csv/.tsv/.parquet file with ``prompt`` and ``target`` columns (optional
    ``pair_id``, kept in ``row_meta`` for the pairing check) as a :class:`TaskDataset`."""
    from .tasks.common import load_located_records, text_columns

    located = load_located_records(path)
    pairs = text_columns(located, ("prompt", "target"), str(path), can_drop=False)
    records = [r for _, r in located]
    data = TaskDataset.from_prompts(model, [p for p, _ in pairs], [t for _, t in pairs], name=name or Path(path).stem)
    if "pair_id" in records[0]:
        data.row_meta["pair_id"] = [r["pair_id"] for r in records]
    return data
