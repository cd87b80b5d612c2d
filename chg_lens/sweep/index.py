"""The index: :func:`status` gives one row per cell (done, running, queued, failed, interrupted,
damaged, pending; attempts, timings, job id, result path, error, converged) from the cells'
folders, their locks and the jobs still queued or running, and writes ``OUT/index.parquet``.

Example::

    from chg_lens import sweep
    idx = sweep.status("sweep.yaml"); idx.status.value_counts()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import pandas as pd

from .. import store
from .cells import ERROR, LOCK, _read_done, cell_dir, read_events
from .config import SweepConfig, load_config

STATUSES = ("done", "running", "queued", "failed", "interrupted", "damaged", "pending")
"""A cell's state in the index; ``damaged``: ``done.json`` is there but the result does not verify
(a truncated or changed file): the next launch refits it, keeping the damaged copy beside it."""


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

def _cell_converged(done: dict | None, folder: Path) -> bool | None:
    """``converged`` of a finished cell: from ``done.json``, or (cells finished before it was recorded
    there) from the saved result."""
    if done is None:
        return None
    if "converged" in done:
        return bool(done["converged"])
    from ..chg import CHGResult

    try:
        return CHGResult.load(folder / "result").converged
    except (OSError, ValueError, KeyError):
        return None
