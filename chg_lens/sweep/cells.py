"""The cell runner, the job a sweep submits: :func:`run_cells` (the function submitit runs, by this
module path) runs each :func:`run_cell` exactly once: lock, skip if done, fit (resuming its
checkpoint), save the result, write ``done.json`` last; ``events.jsonl`` records every start,
completion and failure (:func:`read_events`), and a finished cell whose result does not verify
(:func:`result_problem`) is set aside and refitted.

Example::

    from chg_lens import sweep
    sweep.run_cells("runs/s", [c.to_dict() for c in cfg.cells()])   # [{"cell": ..., "status": "done", ...}, ...]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from .. import store
from ..results import cached
from .config import Cell

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
    from ..results import META, TENSORS, load_bundle

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
    from .. import tasks as task_registry
    from ..chg import fit_chg
    from ..models import load_model

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
    from ..fitting import checkpoint_meta

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
