"""Sweeps: CHG fits over a grid of models x tasks x seeds x lambdas (x any fit option), run as
resumable jobs on Slurm or on this machine through `submitit <https://github.com/facebookincubator/submitit>`_.

A sweep is described by a small config (YAML, TOML, a Python file defining ``CONFIG``, or a dict)::

    name: ioi-demo
    out: runs/sweep-demo                 # relative to the config file
    models: [smollm2-135m-instruct]      # or {name: small, spec: ./folder, dtype: bfloat16, device_map: auto}
    tasks: [ioi, {name: ioi_short, task: ioi, options: {n_prompts: 40}}]
    seeds: [0, 1, 2]                     # fit seeds (an integer n means 0..n-1)
    lambdas: [0.1]
    fit: {n_seeds: 10, updates: 500, reg_updates: 500, batch_size: 64}
    grid: {grad_accum: [1, 4]}           # more fit_chg options to vary
    executor: {kind: slurm, timeout_min: 120, gpus_per_node: 1, slurm_partition: gpu, cells_per_job: 1}

Every cell (one point of the grid) writes its own folder ``OUT/cells/<cell id>/``: ``result/`` (a
:class:`~chg_lens.chg.CHGResult` folder), ``checkpoint/`` while it runs (``fit_chg`` resumes from
it), ``events.jsonl`` (one line per start, completion or failure) and, written last, ``done.json``.
A cell with ``done.json`` is never run again; a killed or failed cell is run again (resumed) on the
next launch. ``OUT/index.parquet`` lists every cell with its status, timings, job id, result path
and error. Example::

    from chg_lens import sweep
    cfg = sweep.load_config("sweep.yaml")
    sweep.run_sweep(cfg)                     # checks every cell, submits what is not done, waits
    sweep.status(cfg)                        # the index as a DataFrame
    frame = sweep.collect(cfg)               # one long frame of scores over every finished cell
    sweep.table2(frame)                      # the paper's Table 2 per (model, task, lambda)
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import store
from .deprecation import keyword_only
from .results import cached

EXECUTORS = ("local", "slurm", "debug")
"""``local``: one subprocess per job on this machine; ``slurm``: sbatch (job arrays); ``debug``: in this process."""
STATUSES = ("done", "running", "queued", "failed", "interrupted", "damaged", "pending")
"""A cell's state in the index; ``damaged``: ``done.json`` is there but the result does not verify
(a truncated or changed file): the next launch refits it, keeping the damaged copy beside it."""
_RESERVED_FIT = {"model", "data", "validation", "checkpoint_dir", "task", "progress", "seed", "lam"}
_SPEC_LOAD_KEYS = ("device", "dtype")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model of the grid: ``label`` names it in results; ``spec`` and ``load`` go to ``load_model``."""

    label: str
    spec: str
    load: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEntry:
    """One task of the grid: a registered task ``task`` called with ``options``, named ``label``."""

    label: str
    task: str
    options: dict = field(default_factory=dict)


@dataclass
class Cell:
    """One job's work: fit CHG for one model, task, fit seed, lambda and set of fit options."""

    model: ModelEntry
    task: TaskEntry
    seed: int
    lam: float
    fit: dict
    varied: dict = field(default_factory=dict)  # the grid options that vary across cells

    @property
    def id(self) -> str:
        """``<model>__<task>__s<seed>__lam<lam>[__k=v...]__<hash>``: readable and unique."""
        parts = [self.model.label, self.task.label, f"s{self.seed}", f"lam{self.lam:g}"]
        parts += [f"{k}={v}" for k, v in sorted(self.varied.items())]
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "__".join(parts))[:150]
        return f"{slug}__{digest}"

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "task": dataclasses.asdict(self.task),
                "seed": self.seed, "lam": self.lam, "fit": dict(self.fit), "varied": dict(self.varied)}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(ModelEntry(**d["model"]), TaskEntry(**d["task"]), int(d["seed"]), float(d["lam"]),
                   dict(d["fit"]), dict(d.get("varied", {})))


@dataclass
class SweepConfig:
    """A parsed sweep config; :meth:`cells` expands the grid (models x tasks x seeds x lambdas x grid)."""

    name: str
    out: Path
    models: list[ModelEntry]
    tasks: list[TaskEntry]
    seeds: list[int]
    lambdas: list[float]
    fit: dict = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    executor: dict = field(default_factory=dict)
    source: str | None = None

    def cells(self) -> list[Cell]:
        import itertools

        keys = sorted(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        out = []
        for m in self.models:
            for t in self.tasks:
                for lam in self.lambdas:
                    for combo in combos:
                        varied = dict(zip(keys, combo))
                        for seed in self.seeds:
                            out.append(Cell(m, t, int(seed), float(lam), {**self.fit, **varied}, varied))
        return out

    @property
    def executor_kind(self) -> str:
        return str(self.executor.get("kind", "local"))


def load_config(source: "str | os.PathLike | dict | SweepConfig", base_dir: str | os.PathLike | None = None) -> SweepConfig:
    """Read a sweep config from a ``.yaml``/``.yml``, ``.toml`` or ``.py`` file (``CONFIG = {...}``),
    or a dict. Relative paths (``out``, model folders) are relative to the file's folder.

    Example::

        cfg = load_config("sweeps/ioi.yaml")
        cfg = load_config({"out": "runs/s", "models": ["smollm2-135m-instruct"], "tasks": ["ioi"], "seeds": 2})
    """
    if isinstance(source, SweepConfig):
        return source
    origin = None
    if isinstance(source, dict):
        raw = dict(source)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no sweep config at {path}")
        raw = _read_config_file(path)
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
        origin = str(path)
    return _parse(raw, base, origin)


def _read_config_file(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(path.read_text())
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        raw = tomllib.loads(path.read_text())
    elif suffix == ".py":
        import runpy

        namespace = runpy.run_path(str(path))
        raw = namespace.get("CONFIG")
        if raw is None:
            raise ValueError(f"{path} must define CONFIG = {{...}} (a dict like the YAML form)")
    else:
        raise ValueError(f"sweep config {path}: use a .yaml, .yml, .toml or .py file")
    if not isinstance(raw, dict):
        raise ValueError(f"sweep config {path} must be a mapping at the top level")
    return raw


_TOP_KEYS = {"name", "out", "models", "tasks", "seeds", "lambdas", "lam", "fit", "grid", "executor"}


def _parse(raw: dict, base: Path, origin: str | None) -> SweepConfig:
    problems = []
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("out", "models", "tasks"):
        if key not in raw:
            problems.append(f"missing '{key}'")
    if problems:
        raise ValueError(f"sweep config {origin or ''}: " + "; ".join(problems))
    out = Path(os.path.expanduser(str(raw["out"])))
    out = out if out.is_absolute() else (base / out)
    seeds = raw.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in _as_list(seeds)]
    lambdas = [float(x) for x in _as_list(raw.get("lambdas", raw.get("lam", [0.1])))]
    models = [_model_entry(m, base) for m in _as_list(raw["models"])]
    tasks = [_task_entry(t) for t in _as_list(raw["tasks"])]
    grid = {str(k): _as_list(v) for k, v in (raw.get("grid") or {}).items()}
    executor = dict(raw.get("executor") or {})
    for what, labels in (("model", [m.label for m in models]), ("task", [t.label for t in tasks]),
                         ("seed", seeds), ("lambda", lambdas)):
        dup = sorted({str(x) for x in labels if labels.count(x) > 1})
        if dup:
            problems.append(f"duplicate {what}(s) {dup}: give each a distinct name/value")
        if not labels:
            problems.append(f"no {what}s: give at least one")
    if problems:
        raise ValueError(f"sweep config {origin or ''}: " + "; ".join(problems))
    return SweepConfig(name=str(raw.get("name", out.name)), out=out.resolve(), models=models, tasks=tasks,
                       seeds=seeds, lambdas=lambdas, fit=dict(raw.get("fit") or {}), grid=grid,
                       executor=executor, source=origin)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _model_entry(m, base: Path) -> ModelEntry:
    if isinstance(m, str):
        m = {"spec": m}
    if not isinstance(m, dict) or "spec" not in m:
        raise ValueError(f"a model entry must be a string or a mapping with 'spec'; got {m!r}")
    m = dict(m)
    spec = os.path.expanduser(str(m.pop("spec")))
    if not os.path.isabs(spec) and (base / spec).exists():
        spec = str((base / spec).resolve())
    label = str(m.pop("name", None) or Path(spec.rstrip("/")).name.removesuffix(".gguf"))
    return ModelEntry(label=label, spec=spec, load=m)


def _task_entry(t) -> TaskEntry:
    if isinstance(t, str):
        return TaskEntry(t, t, {})
    if not isinstance(t, dict) or not ({"name", "task"} & set(t)):
        raise ValueError(f"a task entry must be a string or a mapping with 'name' and/or 'task'; got {t!r}")
    task = str(t.get("task", t.get("name")))
    return TaskEntry(str(t.get("name", task)), task, dict(t.get("options") or {}))


# --------------------------------------------------------------------------------------------
# Checks: every problem of every cell, before anything is submitted
# --------------------------------------------------------------------------------------------


def check_config(cfg: SweepConfig, executor: str | None = None) -> None:
    """Raise one ValueError listing every problem of every cell (unknown model, unknown task, bad
    task or fit option, bad executor parameter); returns None when the sweep can be submitted.
    ``executor`` overrides the config's executor kind."""
    from . import checks
    from . import models as model_io
    from . import tasks as task_registry
    from .chg import check_fit_options, fit_chg

    problems: list[str] = []
    fit_params = set(inspect.signature(fit_chg).parameters) - _RESERVED_FIT
    model_problem = {m.label: _model_problem(m, model_io) for m in cfg.models}
    task_problem = {}
    for t in cfg.tasks:
        try:
            fn = task_registry.get_task(t.task)
            params = list(inspect.signature(fn).parameters)[1:]
            bad = [k for k in t.options if k not in params]
            task_problem[t.label] = (f"task '{t.label}' does not take option(s) {bad}; it takes {params}" if bad else None)
            if not bad:
                task_registry.check_options(t.task, **t.options)  # the check `chg-lens fit` makes
        except ValueError as err:
            task_problem[t.label] = str(err)
    for cell in cfg.cells():
        mine = []
        if model_problem[cell.model.label]:
            mine.append(model_problem[cell.model.label])
        if task_problem[cell.task.label]:
            mine.append(task_problem[cell.task.label])
        bad = sorted(set(cell.fit) - fit_params)
        if bad:
            reserved = sorted(set(bad) & _RESERVED_FIT)
            hint = f" ({reserved} are set by the sweep: use seeds/lambdas/tasks)" if reserved else ""
            mine.append(f"unknown fit option(s) {bad}{hint}; fit_chg takes {sorted(fit_params)}")
        else:
            try:  # the same checks fit_chg makes first
                check_fit_options(**cell.fit, seed=cell.seed, lam=cell.lam)
            except (ValueError, TypeError) as err:
                mine.append(f"bad fit option: {err}")
        problems += [f"cell {cell.id}: {p}" for p in mine]
    kind = executor or cfg.executor_kind
    try:
        _make_executor(cfg, cfg.out / "submitit-check", kind=kind, dry=True)
    except (ValueError, NameError, AssertionError, TypeError) as err:
        problems.append(f"executor: {err}")
    if kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        problems.append("executor: kind 'slurm' but sbatch/srun are not on PATH; run on a Slurm login node "
                        "or use --executor local")
    if problems:
        n = len(cfg.cells())
        raise ValueError(f"sweep '{cfg.name}': {len(problems)} problem(s) in {n} cell(s); nothing was submitted:\n  "
                         + "\n  ".join(problems))


def _model_problem(m: ModelEntry, model_io) -> str | None:
    spec = m.spec
    bad_keys = sorted(set(m.load) - set(_SPEC_LOAD_KEYS) - {"n_devices", "device_map", "max_memory"})
    if bad_keys:
        return (f"model '{m.label}': unknown load option(s) {bad_keys}; use device, dtype, n_devices, "
                "device_map, max_memory")
    from . import checks

    try:
        checks.dtype(m.load.get("dtype"))
        if m.load.get("n_devices") is not None:
            checks.positive_int("n_devices", m.load["n_devices"])
    except ValueError as err:
        return f"model '{m.label}': {err}"
    if spec.lower() == model_io.SMOLLM2_ALIAS:
        try:
            model_io.smollm2_gguf_path()
        except FileNotFoundError as err:
            return f"model '{m.label}': {err}"
        return None
    if spec.lower() == model_io.GEMMA3_ALIAS:  # installed? (assembling the GGUF waits for the load)
        if importlib.util.find_spec(model_io._GEMMA3_PACKAGE) is None:
            return f"model '{m.label}': '{spec}' is not installed: {model_io._GEMMA3_INSTALL}"
        return None
    looks_local = os.path.isabs(spec) or spec.startswith((".", "~")) or spec.endswith(".gguf")
    if looks_local or os.path.exists(spec):
        if not os.path.exists(spec):
            return f"model '{m.label}': unknown model spec {spec!r}: no such file or folder"
        if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
            return f"model '{m.label}': {spec} has no config.json (save it with model.save_pretrained)"
        return None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        return f"model '{m.label}': unknown model spec {spec!r} (not a local path, '{model_io.SMOLLM2_ALIAS}' or a hub name)"
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        try:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
                return f"model '{m.label}': hub model {spec!r} is not in the local cache and the hub is offline"
        except Exception as err:  # noqa: BLE001 - any cache failure is a config problem here
            return f"model '{m.label}': cannot check hub model {spec!r} offline: {err}"
    return None


# --------------------------------------------------------------------------------------------
# The job: run cells (in a Slurm job, a local subprocess, or this process)
# --------------------------------------------------------------------------------------------

DONE, EVENTS, ERROR, LOCK = "done.json", "events.jsonl", "error.json", "lock"


def cell_dir(root: str | os.PathLike, cell: Cell) -> Path:
    return Path(root) / "cells" / cell.id


def run_cells(root: str, cells: list[dict], threads: int | None = None) -> list[dict]:
    """The job function: run each cell (a :meth:`Cell.to_dict`) unless it is done or running.

    Never raises for a cell's own error (it is written to the cell's ``error.json`` and the next
    cell runs); returns one small dict per cell. Models are loaded once per job. Torch uses
    ``threads`` threads (default: Slurm's ``SLURM_CPUS_PER_TASK`` when set, else torch's default).
    """
    threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0) or 0)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    loaded: dict[str, Any] = {}
    return [run_cell(root, Cell.from_dict(c), loaded) for c in cells]


_VERIFIED: dict[tuple, str | None] = {}


def result_problem(folder: str | os.PathLike) -> str | None:
    """Why the result folder of a finished cell cannot be used (missing, truncated, changed: it does
    not load with its digests checked), or None when it verifies. Cached per version of its files,
    so polling the index re-reads nothing."""
    from .results import META, TENSORS, load_bundle

    folder = Path(folder)
    try:
        stamp = (str(folder.resolve()),) + tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in
                                                 (os.stat(folder / n) for n in (TENSORS, META)))
    except OSError as err:
        return f"{folder}: {err.strerror or err}"
    if stamp not in _VERIFIED:
        try:
            load_bundle(folder)
            _VERIFIED[stamp] = None
        except (OSError, ValueError) as err:
            _VERIFIED[stamp] = str(err)
    return _VERIFIED[stamp]


def _read_done(folder: Path) -> tuple[dict | None, str | None]:
    """A cell's ``done.json`` (None when absent) and why the finished cell cannot be used: its
    ``done.json`` is unreadable or its result does not verify (:func:`result_problem`); None if fine."""
    if not (folder / DONE).exists():
        return None, None
    try:
        done = json.loads((folder / DONE).read_text())
        if not isinstance(done, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return None, f"{folder / DONE} cannot be read ({err})"
    return done, result_problem(folder / "result")


def _set_aside(folder: Path, problem: str) -> Path:
    """Move a damaged result (and its done.json) aside as ``result.damaged-N``, so the cell is refitted
    and nothing on disk is lost."""
    n = 1
    while (folder / f"result.damaged-{n}").exists():
        n += 1
    aside = folder / f"result.damaged-{n}"
    if (folder / "result").exists() or (folder / "result").is_symlink():
        store.move_aside(folder / "result", aside)
    else:
        aside.mkdir()
    if (folder / DONE).exists():
        store.move_aside(folder / DONE, aside / DONE)
    _event(folder, "damaged", problem=problem, moved_to=aside.name)
    return aside


def run_cell(root: str | os.PathLike, cell: Cell, loaded: dict | None = None) -> dict:
    """Run one cell exactly once: lock it, skip it if done, fit (resuming its checkpoint), save the
    result, then write ``done.json`` last."""
    folder = cell_dir(root, cell)
    folder.mkdir(parents=True, exist_ok=True)
    with store.try_lock(folder / LOCK) as held:
        if not held:
            return {"cell": cell.id, "status": "running elsewhere"}
        if (folder / DONE).exists():
            problem = _read_done(folder)[1]
            if problem is None:
                return {"cell": cell.id, "status": "already done"}
            _set_aside(folder, problem)  # then fit it again, below
        job_id = _job_id()
        t0 = time.time()
        ckpt = folder / "checkpoint"
        resumed = _checkpoint_step(ckpt)
        _event(folder, "start", job_id=job_id, resumed_from=resumed)
        try:
            result = cached(folder / "result", None, lambda _: _fit_cell(cell, folder, ckpt, loaded if loaded is not None else {}),
                            kind="chg")
            seconds = time.time() - t0
            done = {"cell": cell.id, "job_id": job_id, "finished": _now(), "seconds": seconds,
                    "fit_seconds": result.meta["sweep_seconds"]["fit"], "load_seconds": result.meta["sweep_seconds"]["load"],
                    "resumed_from": resumed, "converged": result.converged}
            store.write_json(folder / DONE, done, indent=2)  # the marker: written last
            _event(folder, "completed", job_id=job_id, seconds=seconds)
            (folder / ERROR).unlink(missing_ok=True)
            shutil.rmtree(ckpt, ignore_errors=True)
            return {"cell": cell.id, "status": "done", "seconds": seconds}
        except Exception as err:  # noqa: BLE001 - recorded per cell; the next launch runs it again
            store.write_json(folder / ERROR, {"error": f"{type(err).__name__}: {err}", "job_id": job_id,
                                              "time": _now(), "traceback": traceback.format_exc()}, indent=2)
            _event(folder, "failed", job_id=job_id, error=f"{type(err).__name__}: {err}")
            return {"cell": cell.id, "status": "failed", "error": f"{type(err).__name__}: {err}"}


def _fit_cell(cell: Cell, folder: Path, ckpt: Path, loaded: dict):
    from . import tasks as task_registry
    from .chg import fit_chg
    from .models import load_model

    t0 = time.perf_counter()
    key = json.dumps([cell.model.spec, cell.model.load], sort_keys=True, default=str)
    if key not in loaded:
        loaded.clear()  # one model in memory at a time
        loaded[key] = load_model(cell.model.spec, **cell.model.load)
    model = loaded[key]
    train, val = task_registry.get_task(cell.task.task)(model, **cell.task.options)
    t1 = time.perf_counter()
    result = fit_chg(model, train, seed=cell.seed, lam=cell.lam, validation=val, checkpoint_dir=ckpt,
                     task=cell.task.label, progress=False, **cell.fit)
    result.meta.update(model=cell.model.label, model_spec=cell.model.spec, task_name=cell.task.task,
                       task_options=cell.task.options, sweep_cell=cell.id, sweep_varied=cell.varied,
                       sweep_seconds={"load": t1 - t0, "fit": time.perf_counter() - t1})
    return result


def _checkpoint_step(ckpt: Path) -> str | None:
    from .fitting import checkpoint_meta

    try:
        m = checkpoint_meta(ckpt)
    except OSError:
        return None
    return None if m is None else f"{m.get('stage')}@{m.get('step')}"


def _job_id() -> str:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job (debug executor, direct call)
        return f"pid{os.getpid()}"


def _event(folder: Path, event: str, **fields) -> None:
    store.append_line(folder / EVENTS, json.dumps({"event": event, "time": _now(), "host": socket.gethostname(),
                                                   "pid": os.getpid(), **fields}))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def read_events(folder: str | os.PathLike) -> list[dict]:
    """The cell's event lines (start / completed / failed), oldest first."""
    path = Path(folder) / EVENTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out


# --------------------------------------------------------------------------------------------
# Status and the index
# --------------------------------------------------------------------------------------------


def _locked(folder: Path) -> bool:
    """Whether a job holds the cell's lock now (it is running the cell)."""
    return store.is_locked(folder / LOCK)


def _jobs(root: Path) -> dict[str, dict]:
    path = root / "jobs.jsonl"
    out: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out[rec["cell"]] = rec
    return out


def _active_job_ids(kind_ids: Iterable[tuple[str, str]]) -> set[str]:
    """Which of these (executor kind, job id) are still queued or running."""
    active = set()
    pairs = list(kind_ids)
    if any(k == "slurm" for k, _ in pairs) and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
            queued = set(out.split())
            active |= {j for k, j in pairs if k == "slurm" and j in queued}
        except (OSError, subprocess.SubprocessError):
            pass
    for k, j in pairs:
        if k == "local" and _pid_alive(j):
            active.add(j)
    return active


def _pid_alive(job_id: str) -> bool:
    try:
        pid = int(job_id)
    except ValueError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def status(config: "str | os.PathLike | dict | SweepConfig", write: bool = True) -> pd.DataFrame:
    """The index: one row per cell with ``status`` (done, running, queued, failed, interrupted,
    damaged, pending; a finished cell whose result does not verify is ``damaged``, and refitted by
    the next launch), ``attempts``, ``completions``, ``started``, ``finished``, ``seconds``,
    ``job_id``, ``result_path``, ``error`` and ``converged`` (the finished fit's :attr:`CHGResult.converged`;
    None while not done); written to ``OUT/index.parquet`` when ``write``.

    Example::

        idx = status("sweep.yaml"); idx.status.value_counts()
    """
    cfg = load_config(config)
    root = cfg.out
    cells = cfg.cells()
    jobs = _jobs(root)
    active = _active_job_ids((r["kind"], r["job_id"]) for r in jobs.values())
    rows = []
    for cell in cells:
        folder = cell_dir(root, cell)
        events = read_events(folder)
        starts = [e for e in events if e["event"] == "start"]
        done, damaged = _read_done(folder)
        try:
            error = json.loads((folder / ERROR).read_text()) if (folder / ERROR).exists() else None
        except (OSError, ValueError):
            error = {"error": f"{folder / ERROR} cannot be read"}
        job = jobs.get(cell.id)
        if damaged is not None and _locked(folder):
            state, done = "running", None  # a job is setting it aside and fitting it again
        elif damaged is not None and job is not None and job["job_id"] in active:
            state, done = "queued", None
        elif damaged is not None:
            state, done = "damaged", None
        elif done is not None:
            state = "done"
        elif _locked(folder):
            state = "running"
        elif job is not None and job["job_id"] in active:
            state = "queued"
        elif error is not None:
            state = "failed"
        elif starts:
            state = "interrupted"
        else:
            state = "pending"
        rows.append({
            "cell": cell.id, "model": cell.model.label, "task": cell.task.label, "seed": cell.seed,
            "lam": cell.lam, "options": json.dumps(cell.varied, sort_keys=True), "status": state,
            "attempts": len(starts), "completions": sum(e["event"] == "completed" for e in events),
            "started": starts[-1]["time"] if starts else None,
            "finished": done["finished"] if done else None,
            "seconds": float(done["seconds"]) if done else float("nan"),
            "fit_seconds": float(done["fit_seconds"]) if done else float("nan"),
            "converged": _cell_converged(done, folder),
            "job_id": (done or {}).get("job_id") or (job or {}).get("job_id"),
            "result_path": str(folder / "result") if done else None,
            "error": (f"the result of this finished cell is damaged ({damaged}); the next run refits it"
                      if damaged is not None else None if done or error is None else error["error"]),
        })
    index = pd.DataFrame(rows)
    if write:
        root.mkdir(parents=True, exist_ok=True)
        store.write_table(index, root / "index.parquet")
    return index


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------

_OWN_EXECUTOR_KEYS = {"kind", "cells_per_job", "python", "slurm", "poll_s", "threads"}


def _make_executor(cfg: SweepConfig, folder: Path, kind: str | None = None, dry: bool = False):
    import submitit

    kind = kind or cfg.executor_kind
    if kind not in EXECUTORS:
        raise ValueError(f"executor kind must be one of {EXECUTORS}; got {kind!r}")
    ex = cfg.executor
    cpj = ex.get("cells_per_job", 1)
    if not isinstance(cpj, int) or cpj < 1:
        raise ValueError(f"cells_per_job must be a positive integer; got {cpj!r}")
    params = {k: v for k, v in ex.items() if k not in _OWN_EXECUTOR_KEYS}
    for k, v in (ex.get("slurm") or {}).items():  # executor.slurm: {partition: ...} = slurm_partition
        params[f"slurm_{k}"] = v
    init = {}
    if kind in ("slurm", "local"):
        init[f"{kind}_python"] = str(ex.get("python") or sys.executable)
    if dry:  # validate the parameters (for every cluster) without needing the cluster here
        folder, kind, init = Path(os.environ.get("TMPDIR", "/tmp")) / "chg-lens-submitit-check", "debug", {}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind, **init)
    params.setdefault("name", f"chg-{cfg.name}")
    if kind == "local":
        params.setdefault("timeout_min", 7 * 24 * 60)  # submitit's local default (2 min) would kill real fits
    executor.update_parameters(**params)
    return executor


@keyword_only("executor", "wait", "poll_s", "progress")
def run_sweep(
    config: "str | os.PathLike | dict | SweepConfig",
    *,
    executor: str | None = None,
    wait: bool = True,
    poll_s: float | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Check every cell, submit the cells that are not done, queued or running (as one job array,
    ``cells_per_job`` cells per job), and with ``wait`` poll until those jobs end. Returns the index.

    ``executor`` overrides the config's ``executor.kind`` (``local``, ``slurm`` or ``debug``), so the
    same config runs on a laptop and on a cluster. Example::

        run_sweep("sweep.yaml")                       # the config's executor
        run_sweep("sweep.yaml", executor="local")     # subprocesses on this machine
    """
    cfg = load_config(config)
    check_config(cfg, executor)
    kind = executor or cfg.executor_kind
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}; got {kind!r}")
    root = cfg.out
    root.mkdir(parents=True, exist_ok=True)
    poll = poll_s or float(cfg.executor.get("poll_s", 2.0))
    with store.folder_lock(root / "submit", "sweep submission"):  # two controllers never submit the same cells
        index, busy, todo, jobs, chunks = _submit(cfg, kind, root, progress, wait)
    if not todo:
        if busy and wait:
            _wait_cells(cfg, busy, poll)
            return status(cfg, write=True)
        return index
    if progress:
        print(f"sweep '{cfg.name}': submitted {len(todo)} cell(s) in {len(chunks)} {kind} job(s); "
              f"{len(cfg.cells()) - len(todo)} done or running", file=sys.stderr)
    if kind == "debug":
        for job in jobs:
            job.result()  # runs in this process
    elif wait:
        _wait([(kind, str(j.job_id)) for j in jobs], poll)
    if busy and wait:
        _wait_cells(cfg, busy, poll)
    return status(cfg, write=True)


def _submit(cfg: SweepConfig, kind: str, root: Path, progress: bool, wait: bool):
    """Under the submission lock: the index, the cells busy from an earlier launch, the cells to
    run, and the submitted jobs (with their chunks of cells)."""
    store.write_json(root / "sweep.json", {"name": cfg.name, "source": cfg.source, "n_cells": len(cfg.cells()),
                                            "cells": [c.to_dict() for c in cfg.cells()]}, indent=1, default=str)
    index = status(cfg, write=True)
    todo_ids = set(index.loc[index.status.isin(["pending", "failed", "interrupted", "damaged"]), "cell"])
    busy = set(index.loc[index.status.isin(["running", "queued"]), "cell"])  # from an earlier launch
    todo = [c for c in cfg.cells() if c.id in todo_ids]
    if busy and progress:
        print(f"sweep '{cfg.name}': {len(busy)} cell(s) are still queued or running from an earlier launch"
              + ("; waiting for them" if wait else ""), file=sys.stderr)
    if not todo:
        return index, busy, todo, [], []
    per_job = int(cfg.executor.get("cells_per_job", 1))
    chunks = [todo[i:i + per_job] for i in range(0, len(todo), per_job)]
    ex = _make_executor(cfg, root / "submitit" / "%j", kind)
    threads = cfg.executor.get("threads")
    jobs = ex.map_array(run_cells, [str(root)] * len(chunks), [[c.to_dict() for c in ch] for ch in chunks],
                        [threads] * len(chunks))
    store.append_lines(root / "jobs.jsonl", [json.dumps({"cell": c.id, "job_id": str(job.job_id), "kind": kind,
                                                         "submitted": _now()})
                                             for job, chunk in zip(jobs, chunks) for c in chunk])
    return index, busy, todo, jobs, chunks


def _wait(kind_ids: list[tuple[str, str]], poll_s: float) -> None:
    while _active_job_ids(kind_ids):
        time.sleep(poll_s)


def _wait_cells(cfg: SweepConfig, cells: set[str], poll_s: float) -> None:
    """Poll until none of ``cells`` is queued or running (jobs of an earlier launch)."""
    while True:
        index = status(cfg, write=False)
        if not index[index.cell.isin(cells)].status.isin(["running", "queued"]).any():
            return
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _cell_converged(done: dict | None, folder: Path) -> bool | None:
    """``converged`` of a finished cell: from ``done.json``, or (cells finished before it was recorded
    there) from the saved result."""
    if done is None:
        return None
    if "converged" in done:
        return bool(done["converged"])
    from .chg import CHGResult

    try:
        return CHGResult.load(folder / "result").converged
    except (OSError, ValueError, KeyError):
        return None


@keyword_only("require_complete", "write", "converged_only")
def collect(config: "str | os.PathLike | dict | SweepConfig", *, require_complete: bool = False,
            write: bool = True, converged_only: bool = False) -> pd.DataFrame:
    """Every finished cell's scores in one long frame: ``model, task, fit_seed, lam, <varied options>,
    seed, mask, layer, head, g_plus, g_minus, facilitation, interference, irrelevance, role, cell``.

    ``mask`` is the mask index inside a cell's fit and ``seed`` numbers masks across the cells of one
    (model, task, lambda, options) group (``fit_seed * n_seeds + mask``), so
    ``taxonomy.aggregate``/``percent_above`` over a group treat every mask as one seed. Written to
    ``OUT/scores.parquet`` when ``write``. With ``converged_only`` only cells whose fit converged
    (the index's ``converged``) are kept. Example::

        frame = collect("sweep.yaml")
        chg_lens.taxonomy.percent_above(frame, by=("model", "task", "lam"))
    """
    from .chg import CHGResult

    cfg = load_config(config)
    index = status(cfg, write=write)
    missing = index[index.status != "done"]
    if require_complete and len(missing):
        raise ValueError(f"{len(missing)} of {len(index)} cells are not done: {', '.join(missing.cell[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; run `chg-lens sweep run` again")
    keep = index.status == "done"
    if converged_only:
        keep &= index.converged.eq(True)  # None (not done) is not converged
    frames = []
    for cell in cfg.cells():
        if cell.id not in set(index.loc[keep, "cell"]):
            continue
        result = CHGResult.load(cell_dir(cfg.out, cell) / "result")
        scores = result.scores()
        n = result.n_seeds
        scores = scores.rename(columns={"seed": "mask"})
        scores.insert(2, "fit_seed", cell.seed)
        scores.insert(3, "lam", cell.lam)
        for i, (k, v) in enumerate(sorted(cell.varied.items())):
            scores.insert(4 + i, k, v)
        scores.insert(4 + len(cell.varied), "seed", cell.seed * n + scores["mask"])
        scores["cell"] = cell.id
        frames.append(scores)
    if not frames:
        return pd.DataFrame(columns=["model", "task", "fit_seed", "lam", "seed", "mask", "layer", "head", "g_plus",
                                     "g_minus", "facilitation", "interference", "irrelevance", "role", "cell"])
    frame = pd.concat(frames, ignore_index=True)
    if write:
        store.write_table(frame, cfg.out / "scores.parquet")
    return frame


def group_columns(frame: pd.DataFrame) -> tuple[str, ...]:
    """The columns that name one fitted condition in a collected frame: model, task, lam, varied options."""
    fixed = {"fit_seed", "seed", "mask", "layer", "head", "g_plus", "g_minus", "facilitation", "interference",
             "irrelevance", "role", "cell"}
    return tuple(c for c in frame.columns if c not in fixed)


def table2(frame: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """The paper's Table 2 per condition: percent of heads whose score is >= ``threshold`` always /
    in any seed (all masks of all fit seeds of a condition count as seeds)."""
    from . import taxonomy

    return taxonomy.percent_above(frame, threshold, by=group_columns(frame))


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Per condition and head: always_* (min over seeds) and any_* (max over seeds), for Figure 3-style plots."""
    from . import taxonomy

    return taxonomy.aggregate(frame, by=group_columns(frame) + ("layer", "head"))
