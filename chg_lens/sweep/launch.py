"""Launching: :func:`run_sweep` checks every cell, submits those not done, queued or running as one
job array (``cells_per_job`` cells per job) on Slurm, local subprocesses or this process, and with
``wait`` polls until they end; two controllers never submit the same cells.

Example::

    from chg_lens import sweep
    sweep.run_sweep("sweep.yaml", executor="local")   # the index, once every job has ended
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from .. import store
from ..deprecation import keyword_only
from .cells import _now, run_cells
from .checks import check_config
from .config import EXECUTORS, SweepConfig, _make_executor, load_config
from .index import _active_job_ids, status


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
