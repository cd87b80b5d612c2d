"""A real Slurm cluster on this machine (tests/slurm/setup_cluster.sh: munged, slurmctld, slurmd),
driven through submitit: a small sweep (tiny model, 2 tasks x 2 seeds, two cells per array job),
one job killed mid-fit with scancel, a relaunch, and every cell finished exactly once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chg_lens import sweep, taxonomy

from test_sweep import completions, tiny_model_folder, tiny_sweep_config

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).resolve().parent / "slurm"
STATE = Path(os.environ.get("CHG_LENS_SLURM_STATE", "/tmp/chg-lens-slurm"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the single-node cluster (installing slurm-wlm and munge if needed); stop it after the
    session if this fixture started it."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (it installs slurm-wlm/munge and runs the daemons)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and apt-get is not available to install it")
    pre = (STATE / "pid" / "slurmctld.pid").exists() and shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo"], env={**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")}, capture_output=True).returncode == 0
    run = subprocess.run(["bash", str(SCRIPTS / "setup_cluster.sh"), str(STATE)], capture_output=True, text=True,
                         timeout=900)
    if run.returncode in (3, 4):
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(STATE / "slurm.conf")
    yield STATE
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not pre:
        subprocess.run(["bash", str(SCRIPTS / "teardown_cluster.sh"), str(STATE)], capture_output=True)


def squeue_ids() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split())


def test_slurm_sweep_killed_with_scancel_and_relaunched_finishes_every_cell_once(slurm_cluster, tmp_path):
    model = tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "run"
    cfg = tiny_sweep_config(model, out, "slurm", updates=400, cells_per_job=2, python=sys.executable,
                            timeout_min=10, cpus_per_task=1, slurm={"partition": "debug"})
    assert cfg["executor"]["python"] == sys.executable  # jobs run this (the project's venv) python
    first = sweep.run_sweep(cfg, wait=False, progress=False)
    job_ids = sorted(set(first.job_id))
    assert len(job_ids) == 2 and all("_" in j for j in job_ids)  # one job array, two tasks
    killed_cell = killed_job = None
    deadline = time.time() + 600  # a safety net: on a quiet machine the first checkpoint comes in seconds
    try:
        while killed_cell is None and time.time() < deadline:
            for row in sweep.status(cfg, write=False).itertuples():
                ckpt = out / "cells" / row.cell / "checkpoint"
                if row.status == "running" and sweep._checkpoint_step(ckpt) is not None:
                    subprocess.run(["scancel", row.job_id], check=True)
                    killed_cell, killed_job = row.cell, row.job_id
                    break
            time.sleep(0.1)
    finally:
        if killed_cell is None:
            subprocess.run(["scancel", *job_ids])
    assert killed_cell is not None, "no cell reached a checkpoint in time"
    while killed_job in squeue_ids():
        time.sleep(0.5)
    mid = sweep.status(cfg).set_index("cell")
    assert mid.loc[killed_cell, "status"] == "interrupted" and mid.loc[killed_cell, "completions"] == 0

    final = sweep.run_sweep(cfg, progress=False)  # relaunch: only what is not done or still queued
    assert (final.status == "done").all() and len(final) == 4, final[["cell", "status", "error"]]
    assert completions(out) == {c: 1 for c in final.cell}  # every cell finished exactly once
    starts = [e for e in sweep.read_events(out / "cells" / killed_cell) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] and starts[1]["job_id"] not in job_ids
    untouched = first.loc[first.job_id != killed_job, ["cell", "job_id"]].itertuples(index=False)
    for cell, job in untouched:  # the other array task's cells ran once, in that task, and never again
        assert [e["job_id"] for e in sweep.read_events(out / "cells" / cell) if e["event"] == "start"] == [job]

    frame = sweep.collect(cfg, require_complete=True)
    assert len(frame) == 4 * 2 * 2 * 4 and frame.cell.nunique() == 4
    assert set(zip(frame.task, frame.fit_seed)) == {(t, s) for t in ("ioi_a", "ioi_b") for s in (0, 1)}
    assert set(frame.role) <= set(taxonomy.ROLES.values())
