"""``chg-lens sweep run|status|collect CONFIG``: CHG fits over models x tasks x seeds x lambdas."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["run", "status", "collect"],
                   help="run: submit what is not done (and wait); status: the index; collect: scores of finished cells")
    p.add_argument("config", help="sweep config (.yaml, .toml or .py); see docs/sweeps.md")
    p.add_argument("--executor", choices=["local", "slurm", "debug"], default=None,
                   help="override the config's executor.kind")
    p.add_argument("--no-wait", action="store_true", help="run: return once the jobs are submitted")
    p.add_argument("--out", default=None, help="collect: also write the frame to this .parquet or .csv file")


def run(a: argparse.Namespace) -> int:
    from .. import sweep

    if a.action == "run":
        index = sweep.run_sweep(a.config, executor=a.executor, wait=not a.no_wait)
    elif a.action == "status":
        index = sweep.status(a.config)
    else:
        frame = sweep.collect(a.config)
        cfg = sweep.load_config(a.config)
        if a.out:
            frame.to_parquet(a.out, index=False) if a.out.endswith(".parquet") else frame.to_csv(a.out, index=False)
        n_cells = frame["cell"].nunique() if len(frame) else 0
        print(f"{len(frame)} rows from {n_cells} finished cell(s) -> {cfg.out / 'scores.parquet'}")
        if len(frame):
            print(sweep.table2(frame).to_string(index=False))
        return 0
    counts = index["status"].value_counts().to_dict()
    print(index[["cell", "status", "attempts", "seconds", "job_id", "error"]].to_string(index=False))
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if a.action == "status" or set(counts) <= {"done", "queued", "running"} else 1
