"""``chg-lens sweep run|status|collect CONFIG``: CHG fits over models x tasks x seeds x lambdas."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run", "status", "collect"],
                   help="run: submit what is not done (and wait); status: the index; collect: scores of finished cells")
    p.add_argument("config", help="sweep config (.yaml, .toml or .py); see docs/sweeps.md")
    p.add_argument("--executor", choices=["local", "slurm", "debug"], default=None,
                   help="override the config's executor.kind")
    p.add_argument("--no-wait", action="store_true", help="run: return once the jobs are submitted")
    p.add_argument("--out", default=None, help="collect: also write the frame to this .parquet or .csv file")
    p.add_argument("--converged-only", action="store_true",
                   help="collect: only cells whose fit converged (the index's `converged` column)")


def run(a: argparse.Namespace) -> int:
    import sys

    from .. import sweep

    if a.out:
        _check_table_path(a.out)
    if a.action == "run":
        index = sweep.run_sweep(a.config, executor=a.executor, wait=not a.no_wait)
    elif a.action == "status":
        index = sweep.status(a.config)
    else:
        frame = sweep.collect(a.config, converged_only=a.converged_only)
        cfg = sweep.load_config(a.config)
        if a.out:
            _write_table(frame, Path(a.out))
        n_cells = frame["cell"].nunique() if len(frame) else 0
        print(f"{len(frame)} rows from {n_cells} finished cell(s) -> {cfg.out / 'scores.parquet'}")
        if len(frame):
            print(sweep.table2(frame).to_string(index=False))
        return 0
    counts = index["status"].value_counts().to_dict()
    if a.action == "run" and a.no_wait and counts.get("running", 0) + counts.get("queued", 0):
        print(f"{counts.get('running', 0) + counts.get('queued', 0)} cell(s) are still queued or running; "
              "`chg-lens sweep status CONFIG` follows them", file=sys.stderr)
    print(index[["cell", "status", "converged", "attempts", "seconds", "job_id", "error"]].to_string(index=False))
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if a.action == "status" or set(counts) <= {"done", "queued", "running"} else 1


def _check_table_path(path: str) -> None:
    from .. import checks

    p = Path(path)
    if p.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out {path}: give a .parquet or .csv file name")
    if p.is_dir():
        raise ValueError(f"--out {path} is a folder; give a .parquet or .csv file name")
    checks.output_dir(p.parent, "--out's folder")


def _write_table(frame, path: Path) -> None:
    from .. import store

    path.parent.mkdir(parents=True, exist_ok=True)
    store.write_table(frame, path)
