"""Checks: every problem of every cell of a sweep, in one ValueError, before anything is submitted
(:func:`check_config`: unknown models and tasks, bad task, fit, load and executor options).

Example::

    from chg_lens import sweep
    sweep.check_config(sweep.load_config("sweep.yaml"))   # None, or one ValueError listing every problem
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil

from .config import ModelEntry, SweepConfig, _make_executor

_RESERVED_FIT = {"model", "data", "validation", "checkpoint_dir", "task", "progress", "seed", "lam"}
_SPEC_LOAD_KEYS = ("device", "dtype")


# --------------------------------------------------------------------------------------------
# Checks: every problem of every cell, before anything is submitted
# --------------------------------------------------------------------------------------------


def check_config(cfg: SweepConfig, executor: str | None = None) -> None:
    """Raise one ValueError listing every problem of every cell (unknown model, unknown task, bad
    task or fit option, bad executor parameter); returns None when the sweep can be submitted.
    ``executor`` overrides the config's executor kind."""
    from .. import checks
    from .. import models as model_io
    from .. import tasks as task_registry
    from ..chg import check_fit_options, fit_chg

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
    from .. import checks

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
