"""The gate-fitting loop shared by CHG and contrastive CHG.

Gates are ``sigmoid(logits)`` with one logit tensor ``[n_configs, n_layers, n_heads]`` fitted by
Adam. Adam is element-wise, so configurations (seeds, G+ and G-) batched together in one tensor
are fitted exactly as if each had its own optimizer, while sharing every forward pass.

An objective gives a per-configuration data loss for a set of rows (the loop splits each update's
batch into ``grad_accum`` micro-batches, weighting them so the sum equals the full-batch loss) and
a per-configuration regulariser on the logits. Batches are drawn from a generator seeded by
``(seed, stage, update)``, so a fit resumed from a checkpoint makes exactly the same updates as one
that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import checks, diagnostics, models, runtime, store
from .options import OptionSet, option
from .results import library_versions, load_bundle

DataLoss = Callable[[Float[Tensor, "configs layer head"], Int[Tensor, "rows"]], tuple[Tensor, dict[str, Tensor]]]
"""``(gates, row_index) -> (loss [configs], traces {name: [configs]})``: mean over the rows given."""
Regularizer = Callable[[Float[Tensor, "configs layer head"]], tuple[Tensor, dict[str, Tensor]]]
"""``logits -> (loss [configs], traces {name: [configs]})``."""


@dataclass
class Stage:
    """One fitting stage: ``updates`` Adam steps, learning rate linear from ``lr_start`` to ``lr_end``."""

    name: str
    updates: int
    lr_start: float
    lr_end: float
    batch_key: str = ""  # stages with the same key draw the same batches (default: the name)

    def lr(self, step: int) -> float:
        if self.updates <= 1:
            return self.lr_start
        return self.lr_start + (self.lr_end - self.lr_start) * step / (self.updates - 1)


@dataclass
class StageResult:
    logits: Float[Tensor, "configs layer head"]
    traces: dict[str, Float[Tensor, "updates configs"]]
    snapshots: Float[Tensor, "snaps configs layer head"]
    snapshot_steps: Int[Tensor, "snaps"]
    seconds: float = 0.0
    updates: int = -1  # updates taken (fewer than planned when the stage stopped once settled)

    def __post_init__(self):
        if self.updates < 0:
            self.updates = int(next(iter(self.traces.values())).shape[0]) if self.traces else 0


@dataclass
class SettleRule:
    """Stop a stage once it has settled (:func:`chg_lens.diagnostics.is_settled` for every
    configuration) over the last ``window`` updates, judged on the trace ``trace``."""

    window: int
    thresholds: diagnostics.Thresholds = field(default_factory=diagnostics.Thresholds)
    trace: str = "nll"

    def settled(self, start: Tensor, end: Tensor, trace: Tensor) -> bool:
        _, share = diagnostics.gate_movement(start, end, self.thresholds.move)
        slope, se = diagnostics.nll_slope(trace)
        return bool(diagnostics.is_settled(share, slope, se, self.window, self.thresholds).all())


def uniform_gate_logits(shape: tuple[int, ...], seed: int) -> Tensor:
    """Logits whose sigmoid is U(0, 1), drawn reproducibly from ``seed``."""
    g = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.clamp(1e-4, 1 - 1e-4)
    return torch.log(g / (1 - g)).float()


def clipped_logit_mean(logits: Tensor, clip: float = 4.0) -> Float[Tensor, "configs"]:
    """``mean(clamp(logits, -clip, clip))`` per configuration: the paper's clipped inverse sigmoid."""
    return logits.clamp(-clip, clip).flatten(1).mean(dim=1)


def batch_rows(n_rows: int, batch_size: int, seed: int, stage: str, step: int) -> Int[Tensor, "batch"]:
    """The rows of update ``step`` of ``stage``: a pure function of its arguments."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{stage}/{step}".encode()).digest()[:8], "little")
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(key))
    return perm[: min(batch_size, n_rows)]


@dataclass
class Checkpointer:
    """Writes the fit state every ``every`` updates to ``path``; ``key`` ties it to one fit's settings.

    Each save is a new generation ``path/gen-NNNNNN/`` (tensors and a ``meta.json`` holding their
    digest), written under a hidden name and renamed into place in one step; the two newest
    generations are kept. :meth:`load` takes the newest generation whose digest checks out and
    falls back to the one before it (with a warning) when the newest is damaged, so a kill at any
    point resumes from a consistent state. :meth:`locked` holds a lock for the whole fit: a second
    fit writing the same checkpoint gets a ValueError at once.
    """

    path: Path
    key: dict
    every: int = 50
    keep: int = 2
    _digest: str = field(init=False, default="")

    def __post_init__(self):
        from . import checks

        self.path = Path(self.path)
        self.every = checks.positive_int("checkpoint_every", self.every)
        checks.output_dir(self.path, "checkpoint_dir")
        self._digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()

    def locked(self):
        return store.folder_lock(self.path, "checkpoint")

    def generations(self) -> list[Path]:
        """Complete generation folders, newest first."""
        if not self.path.is_dir():
            return []
        gens = [p for p in self.path.iterdir() if p.is_dir() and re.fullmatch(r"gen-\d{6}", p.name)]
        return sorted(gens, key=lambda p: p.name, reverse=True)

    def load(self) -> tuple[dict[str, Tensor], dict] | None:
        """The newest consistent checkpoint state ``(tensors, meta)``, or None when there is none."""
        candidates = self.generations()
        if not candidates and (self.path / "meta.json").exists():
            self._refuse_a_result()
            candidates = [self.path]  # a checkpoint written before generations existed
        problems = []
        for gen in candidates:
            try:
                tensors, meta = load_bundle(gen)
            except (ValueError, FileNotFoundError) as err:
                problems.append(str(err))
                continue
            if meta.get("digest") != self._digest:
                raise ValueError(self._mismatch(meta.get("key")))
            if problems:
                warnings.warn(f"checkpoint {self.path}: skipped {len(problems)} damaged generation(s) "
                              f"({problems[0]}); resuming from {gen.name}", stacklevel=2)
            return tensors, meta
        if problems:
            raise ValueError(f"no usable checkpoint in {self.path}: {'; '.join(problems)}; delete the folder "
                             "to start the fit over")
        return None

    def _refuse_a_result(self) -> None:
        """A folder holding a saved result (meta.json with a ``kind``) is not a checkpoint."""
        from .results import read_meta

        try:
            kind = read_meta(self.path).get("kind")
        except ValueError:
            return  # damaged: load() reports it
        if kind is not None:
            raise ValueError(f"checkpoint_dir {self.path} holds a saved {kind!r} result, not a "
                             f"checkpoint: load it with chg_lens.load({str(self.path)!r}), or pass a new or empty "
                             "checkpoint folder (e.g. its checkpoint/ subfolder)")

    def _mismatch(self, stored: dict | None) -> str:
        """Why the checkpoint's key is not this fit's: the keys that differ, named."""
        from .results import identity_differences

        where = f"the checkpoint in {self.path}"
        todo = "use another checkpoint folder (or --out), or delete it to start the fit over"
        if not isinstance(stored, dict):
            return f"{where} was written by another fit or an older release (it records no key); {todo}"
        diff = identity_differences(stored, self.key)
        diff += [f"{k} (none there)" for k in sorted(set(self.key) - set(stored))]
        diff += [f"{k} (not set now)" for k in sorted(set(stored) - set(self.key))]
        why = ""
        if any(d.startswith("weights") for d in diff):
            why = ": the model's weights are not those the checkpoint was fitted on (the model folder changed?)"
        return f"{where} was written by a fit with other settings (it differs in {', '.join(diff) or 'its key'}){why}; {todo}"

    def save(self, tensors: dict[str, Tensor], meta: dict) -> None:
        from .results import write_bundle_files

        self.path.mkdir(parents=True, exist_ok=True)
        gens = self.generations()
        n = int(gens[0].name[4:]) + 1 if gens else 1
        # written under a hidden name, then one rename makes the generation current
        stored = {**meta, "digest": self._digest, "key": self.key}
        store.publish_folder(self.path / f"gen-{n:06d}", lambda tmp: write_bundle_files(tmp, tensors, stored))
        for old in [*gens[self.keep - 1:], *store.temporaries(self.path)]:  # older generations, killed writes
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """The metadata (stage, step, ...) of the newest consistent checkpoint in ``path``, or None;
    a quick look that does not check which fit wrote it."""
    ckpt = Checkpointer.__new__(Checkpointer)
    ckpt.path = Path(path)
    for gen in ckpt.generations() or ([ckpt.path] if (ckpt.path / "meta.json").exists() else []):
        try:
            return load_bundle(gen)[1]
        except (ValueError, FileNotFoundError):
            continue
    return None


def check_finite(stage: str, step: int, updates: int, logits: Tensor, loss: Tensor) -> None:
    """Stop a fit whose gate logits or loss became NaN or infinite, naming the stage and update."""
    where = f"stage {stage}, update {step + 1} of {updates}"
    if not bool(torch.isfinite(loss).all()):
        bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
        raise FloatingPointError(f"{where}: the loss is not finite for configuration(s) "
                                 f"{bad[:8]}; lower the learning rate or lambda, or check the model's outputs")
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"{where}: gate logits became non-finite; lower the "
                                 "learning rate or lambda")


def check_configs_per_pass(configs_per_pass: int | None) -> None:
    """``None`` (every configuration in one pass) or a positive int; anything else fails early."""
    if configs_per_pass is not None and (isinstance(configs_per_pass, bool) or not isinstance(configs_per_pass, int)
                                         or configs_per_pass < 1):
        raise ValueError(f"configs_per_pass must be a positive int or None (all in one pass); got {configs_per_pass!r}")


def check_autocast(mode: Any) -> None:
    """The values :func:`chg_lens.models.resolve_autocast` accepts (checked without a model):
    ``"auto"``, ``"bf16"``, ``"fp16"``, ``"off"``, a bf16/fp16 dtype or its name, or None."""
    if mode is None or (isinstance(mode, str) and mode in models.AUTOCAST_MODES):
        return
    try:
        dtype = checks.dtype(mode)
    except (ValueError, TypeError):
        dtype = None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast must be one of {models.AUTOCAST_MODES} or None; got {mode!r}")


# The help of the fit options CHG and contrastive CHG both declare (one wording for both; each
# fit sets its own default): ``option(10, SHARED_HELP["n_seeds"])``.
SHARED_HELP = {
    "n_seeds": "gate masks fitted at once, each from its own U(0, 1) start; they share every pass",
    "seed": "seed of the initial gates and of the batches",
    "clip": "logits are clamped to [-clip, clip] in the regulariser",
    "grad_accum": "micro-batches per update (the same gradient, less memory)",
    "snapshot_every": "updates between two gate snapshots (trajectories, diagnostics)",
}


@dataclass
class RunOptions(OptionSet):
    """How a fit runs, not what it fits: the options every fit (CHG, contrastive) shares that are
    not part of a result's identity or of its checkpoint key (a fit resumed with other run options
    is the same fit). Each fit extends it with its own (:class:`chg_lens.chg.CHGRunOptions`,
    :class:`chg_lens.contrastive.ContrastiveRunOptions`)."""

    checkpoint_dir: str | os.PathLike | None = option(
        None, "folder for resumable checkpoints: a fit called again with the same options resumes where it stopped")
    checkpoint_every: int = option(50, "updates between two checkpoints (with checkpoint_dir)")
    progress: bool = option(True, "show progress bars")
    autocast: str | None = option(
        "auto", "precision of the fit's passes: auto (bf16 where the hardware runs it natively), bf16, fp16 or off")
    configs_per_pass: int | None = option(
        None, "at most this many gate configurations per forward pass (the same gradient, less memory; None: all)")

    def check(self) -> None:
        checks.positive_int("checkpoint_every", self.checkpoint_every)
        check_configs_per_pass(self.configs_per_pass)
        check_autocast(self.autocast)
        if self.checkpoint_dir is not None:
            checks.output_dir(self.checkpoint_dir, "checkpoint_dir")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be true or false; got {self.progress!r}")


def run_stage(
    stage: Stage,
    logits: Float[Tensor, "configs layer head"],
    data_loss: DataLoss,
    regularizer: Regularizer | None,
    n_rows: int,
    batch_size: int,
    seed: int,
    grad_accum: int = 1,
    snapshot_every: int = 10,
    checkpoint: Checkpointer | None = None,
    carry: dict[str, Tensor] | None = None,
    progress: bool = True,
    configs_per_pass: int | None = None,
    window: int | None = None,
    settle: SettleRule | None = None,
    threads: runtime.LoadAwareThreads | None = None,
) -> StageResult:
    """Fit ``logits`` for one stage and return them with per-update traces and snapshots.

    ``carry`` holds tensors of earlier stages that a checkpoint of this stage must keep.
    ``window`` (the diagnostics window, in updates) adds a snapshot where that window starts, so
    the gate movement over it is measured exactly. With ``settle`` the stage ends at the first
    update after which the rule holds over its window (``stage.updates`` is then the maximum); the
    learning rate keeps the full-length schedule, so a stage that stops early ends at a higher rate
    than ``stage.lr_end``. The gates of the last ``settle.window`` updates are kept in checkpoints.
    ``configs_per_pass`` splits the gate configurations into groups that run (forward and backward)
    one after the other: each configuration's loss is its own, so the gradients are the same, and
    the activations held at once shrink with the group size. ``threads`` (a started
    :class:`chg_lens.runtime.LoadAwareThreads`) re-judges the CPU load before each update.
    """
    param = torch.nn.Parameter(logits.detach().clone().float())
    opt = torch.optim.Adam([param], lr=stage.lr_start)
    traces: dict[str, list[Tensor]] = {}
    snaps, snap_steps = [], []
    recent: list[Tensor] = []  # with ``settle``: gates after each of the last settle.window updates (and before)
    start, elapsed = 0, 0.0
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and state[1].get("stage") == stage.name:
        t, meta = state
        start, elapsed = int(meta["step"]), float(meta["seconds"])
        with torch.no_grad():
            param.copy_(t["stage/logits"])
        if start > 0:
            opt.state[param] = {"step": torch.tensor(float(start)), "exp_avg": t["stage/exp_avg"].clone(),
                                "exp_avg_sq": t["stage/exp_avg_sq"].clone()}
        traces = {k[len("stage/trace/"):]: list(v) for k, v in t.items() if k.startswith("stage/trace/")}
        if "stage/snapshots" in t:
            snaps, snap_steps = list(t["stage/snapshots"]), t["stage/snapshot_steps"].tolist()
        if "stage/recent" in t:
            recent = list(t["stage/recent"])

    def save_checkpoint(step: int) -> None:
        exp = opt.state.get(param, {})
        tensors = {"stage/logits": param.detach()}
        if exp:
            tensors.update({"stage/exp_avg": exp["exp_avg"], "stage/exp_avg_sq": exp["exp_avg_sq"]})
        tensors.update({f"stage/trace/{k}": torch.stack(v) for k, v in traces.items() if v})
        if snaps:
            tensors.update({"stage/snapshots": torch.stack(snaps), "stage/snapshot_steps": torch.tensor(snap_steps)})
        if recent:
            tensors["stage/recent"] = torch.stack(recent)
        tensors.update(carry or {})
        checkpoint.save(tensors, {"stage": stage.name, "step": step, "seconds": elapsed + time.perf_counter() - t0})

    n_configs = param.shape[0]
    size = n_configs if configs_per_pass is None else configs_per_pass
    config_groups = [slice(i, min(i + size, n_configs)) for i in range(0, n_configs, size)]
    window_at = None if window is None else stage.updates - min(window, stage.updates)
    if settle is not None and not recent:
        recent = [torch.sigmoid(param.detach()).clone()]
    taken = stage.updates
    t0 = time.perf_counter()
    bar = tqdm(range(start, stage.updates), desc=f"CHG {stage.name}", disable=not progress,
               initial=start, total=stage.updates, leave=True)
    for step in bar:
        if threads is not None:
            threads.adapt()
        if step % snapshot_every == 0 or step == window_at:
            snaps.append(torch.sigmoid(param.detach()).clone())
            snap_steps.append(step)
        for group in opt.param_groups:
            group["lr"] = stage.lr(step)
        opt.zero_grad(set_to_none=True)
        rows = batch_rows(n_rows, batch_size, seed, stage.batch_key or stage.name, step)
        step_traces: dict[str, Tensor] = {}
        data_total = torch.zeros(n_configs)
        for chunk in rows.chunk(max(1, min(grad_accum, len(rows)))):
            weight = len(chunk) / len(rows)
            for group in config_groups:
                loss, parts = data_loss(torch.sigmoid(param[group]), chunk)
                (weight * loss.sum()).backward()
                data_total[group] += weight * loss.detach().cpu()
                for k, v in parts.items():
                    step_traces.setdefault(k, torch.zeros(n_configs))[group] += weight * v.detach().cpu()
        step_traces["loss"] = data_total
        if regularizer is not None:
            reg_loss, reg_parts = regularizer(param)
            reg_loss.sum().backward()
            step_traces["loss"] = data_total + reg_loss.detach().cpu()
            step_traces.update({k: v.detach().cpu() for k, v in reg_parts.items()})
        check_finite(stage.name, step, stage.updates, param.detach(), step_traces["loss"])
        opt.step()
        check_finite(stage.name, step, stage.updates, param.detach(), step_traces["loss"])
        for k, v in step_traces.items():
            traces.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32))
        if progress:
            bar.set_postfix(loss=f"{float(step_traces['loss'].mean()):.4f}")
        if settle is not None:
            recent = (recent + [torch.sigmoid(param.detach()).clone()])[-(settle.window + 1):]
            done_now = step + 1
            if done_now >= settle.window and done_now < stage.updates and settle.settled(
                    recent[0], recent[-1], torch.stack(traces[settle.trace][-settle.window:])):
                taken = done_now
                if done_now - settle.window not in snap_steps:  # the window's start, for the diagnostics
                    at = sum(s < done_now - settle.window for s in snap_steps)
                    snaps.insert(at, recent[0])
                    snap_steps.insert(at, done_now - settle.window)
                break
        if checkpoint is not None and (step + 1) % checkpoint.every == 0 and step + 1 < stage.updates:
            save_checkpoint(step + 1)
    bar.close()
    snaps.append(torch.sigmoid(param.detach()).clone())
    snap_steps.append(taken)
    return StageResult(
        logits=param.detach().clone(),
        traces={k: torch.stack(v) for k, v in traces.items()},
        snapshots=torch.stack(snaps),
        snapshot_steps=torch.tensor(snap_steps),
        seconds=elapsed + time.perf_counter() - t0,
        updates=taken,
    )


@dataclass
class StageSpec:
    """A stage, how its starting logits follow from the stages done before it, and its regulariser."""

    stage: Stage
    init: Callable[[dict[str, StageResult]], Tensor]
    regularizer: Regularizer | None = None
    window: int | None = None  # diagnostics window (updates): a snapshot is kept where it starts
    settle: SettleRule | None = None  # stop the stage once settled


def run_stages(
    specs: list[StageSpec],
    data_loss: DataLoss,
    n_rows: int,
    batch_size: int,
    seed: int,
    grad_accum: int = 1,
    snapshot_every: int = 10,
    checkpoint: Checkpointer | None = None,
    progress: bool = True,
    configs_per_pass: int | None = None,
) -> dict[str, StageResult]:
    """Run stages in order; with a checkpoint, finished stages are kept and a cut fit resumes.
    Torch's thread count follows the CPU load meanwhile (:class:`chg_lens.runtime.LoadAwareThreads`;
    ``CHG_LENS_THREADS=fixed`` turns that off) and is restored at the end."""
    with runtime.LoadAwareThreads() as threads:
        if checkpoint is None:
            return _run_stages(specs, data_loss, n_rows, batch_size, seed, grad_accum, snapshot_every, None, progress,
                               configs_per_pass, threads)
        with checkpoint.locked():
            return _run_stages(specs, data_loss, n_rows, batch_size, seed, grad_accum, snapshot_every, checkpoint,
                               progress, configs_per_pass, threads)


def _run_stages(specs, data_loss, n_rows, batch_size, seed, grad_accum, snapshot_every, checkpoint, progress,
                configs_per_pass, threads=None) -> dict[str, StageResult]:
    done: dict[str, StageResult] = {}
    if checkpoint is not None:
        state = checkpoint.load()
        if state is not None:
            done = _unpack_done(state[0])
    for spec in specs:
        if spec.stage.name in done:
            continue
        result = run_stage(
            spec.stage, spec.init(done), data_loss, spec.regularizer, n_rows, batch_size, seed,
            grad_accum=grad_accum, snapshot_every=snapshot_every, checkpoint=checkpoint,
            carry=_pack_done(done), progress=progress, configs_per_pass=configs_per_pass,
            window=spec.window, settle=spec.settle, threads=threads,
        )
        done[spec.stage.name] = result
        if checkpoint is not None:
            checkpoint.save(_pack_done(done), {"stage": f"{spec.stage.name}:done", "step": 0, "seconds": 0.0})
    return done


def _pack_done(done: dict[str, StageResult]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, r in done.items():
        out[f"done/{name}/logits"] = r.logits
        out[f"done/{name}/snapshots"] = r.snapshots
        out[f"done/{name}/snapshot_steps"] = r.snapshot_steps
        out[f"done/{name}/seconds"] = torch.tensor(r.seconds, dtype=torch.float64)
        out[f"done/{name}/updates"] = torch.tensor(r.updates, dtype=torch.int64)
        out.update({f"done/{name}/trace/{k}": v for k, v in r.traces.items()})
    return out


def _unpack_done(tensors: dict[str, Tensor]) -> dict[str, StageResult]:
    names = {k.split("/")[1] for k in tensors if k.startswith("done/")}
    done = {}
    for n in names:
        p = f"done/{n}/"
        done[n] = StageResult(
            logits=tensors[p + "logits"], snapshots=tensors[p + "snapshots"],
            snapshot_steps=tensors[p + "snapshot_steps"], seconds=float(tensors[p + "seconds"]),
            traces={k[len(p + "trace/"):]: v for k, v in tensors.items() if k.startswith(p + "trace/")},
            updates=int(tensors[p + "updates"]) if p + "updates" in tensors else -1,
        )
    return done


# ----------------------------------------------------------------------------------------- one fit
@dataclass
class FitPlan:
    """What one fit says that differs from another (built by :func:`run_fit`'s ``plan`` once the
    model is resolved): its stages, its data loss, how many rows the batches are drawn from and the
    data's part of the checkpoint key (e.g. ``{"data": data.fingerprint()}``)."""

    specs: list[StageSpec]
    data_loss: DataLoss
    n_rows: int
    key: dict[str, Any]


def run_fit(
    model: Any,
    config: Any,
    run: RunOptions,
    datasets: Sequence[Any],
    plan: Callable[[Any, str | None, int, int], FitPlan],
    result: Callable[[dict[str, StageResult], dict[str, Any]], Any],
    validate: Callable[[Any, Any], None] | None = None,
):
    """The skeleton every gate fit shares (CHG, contrastive), after its options were checked
    (:func:`chg_lens.options.takes_options`): the model (:func:`chg_lens.models.as_model`), each of
    ``datasets`` checked against it, the precision resolved, ``plan(model, autocast, n_layers,
    n_heads)`` (the fit's stages and loss), a :class:`Checkpointer` keyed by the config, the data's
    key, the model, its shape and weights (and the precision), :func:`run_stages` with the weights
    frozen and cast once, ``result(done, meta)`` (the fit's result from the finished stages and the
    common meta: model, shape, weights, versions, ``tl_major``, ``configs_per_pass``, precision),
    ``validate(model, result)`` when given, and the convergence warning.

    ``config`` is the fit's option set (a dataclass with ``batch_size``, ``seed``, ``grad_accum``,
    ``snapshot_every``): what makes two fits the same fit. Returns ``result``'s result.

    Example (what ``fit_contrastive`` does)::

        return run_fit(model, config, run, [retain, forget], plan, result, validate)
    """
    model = models.as_model(model)
    for data in datasets:
        data.check_model(model)
    autocast = models.resolve_autocast(model, run.autocast)  # a bad value fails here, before any work
    L, H = models.n_layers(model), models.n_heads(model)
    fit = plan(model, autocast, L, H)
    weights = models.weights_fingerprint(model)  # before any cast: the model's own weights
    ckpt = None
    if run.checkpoint_dir is not None:
        key = {"config": asdict(config), **fit.key, "model": models.model_name(model), "shape": [L, H],
               "weights": weights}
        if autocast is not None:
            key["autocast"] = str(autocast)
        ckpt = Checkpointer(Path(run.checkpoint_dir), key, every=run.checkpoint_every)
    with models.frozen(model), models.cast_weights_once(model, autocast):
        done = run_stages(fit.specs, fit.data_loss, fit.n_rows, config.batch_size, config.seed, config.grad_accum,
                          config.snapshot_every, ckpt, run.progress, configs_per_pass=run.configs_per_pass)
    meta = {"model": models.model_name(model), "n_layers": L, "n_heads": H, "weights": weights,
            "versions": library_versions(), "tl_major": models.TL_MAJOR, "configs_per_pass": run.configs_per_pass,
            **models.precision_meta(model, autocast)}
    out = result(done, meta)
    if validate is not None:
        validate(model, out)
    diagnostics.warn_if_not_converged(out.convergence_warning())
    return out
