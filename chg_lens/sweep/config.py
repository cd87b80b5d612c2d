"""A sweep's config: :func:`load_config` reads YAML, TOML, a Python file defining ``CONFIG``, or a dict
into a :class:`SweepConfig` (models x tasks x seeds x lambdas x grid), whose :meth:`SweepConfig.cells`
are the :class:`Cell` s of the grid, each with a readable, unique :attr:`Cell.id`; and the submitit
executor the config's ``executor`` section describes.

Example::

    from chg_lens import sweep
    cfg = sweep.load_config({"out": "runs/s", "models": ["smollm2-135m-instruct"], "tasks": ["ioi"], "seeds": 2})
    [c.id for c in cfg.cells()]   # ['smollm2-135m-instruct__ioi__s0__lam0.1__...', ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXECUTORS = ("local", "slurm", "debug")
"""``local``: one subprocess per job on this machine; ``slurm``: sbatch (job arrays); ``debug``: in this process."""


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
# The executor a config describes
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
