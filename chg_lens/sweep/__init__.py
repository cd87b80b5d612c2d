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
and error.

The package holds six concepts, one module each; every name is importable from ``chg_lens.sweep``
as well: :mod:`~chg_lens.sweep.config` (:func:`load_config`, :class:`SweepConfig`, :class:`Cell`,
the executor a config describes), :mod:`~chg_lens.sweep.checks` (:func:`check_config`),
:mod:`~chg_lens.sweep.cells` (the job: :func:`run_cells`, the function submitit runs, and
:func:`run_cell`), :mod:`~chg_lens.sweep.index` (:func:`status`), :mod:`~chg_lens.sweep.launch`
(:func:`run_sweep`) and :mod:`~chg_lens.sweep.collection` (:func:`collect`, :func:`table2`,
:func:`aggregate`).

Example::

    from chg_lens import sweep
    cfg = sweep.load_config("sweep.yaml")
    sweep.run_sweep(cfg)                     # checks every cell, submits what is not done, waits
    sweep.status(cfg)                        # the index as a DataFrame
    frame = sweep.collect(cfg)               # one long frame of scores over every finished cell
    sweep.table2(frame)                      # the paper's Table 2 per (model, task, lambda)
"""

from .config import EXECUTORS, Cell, ModelEntry, SweepConfig, TaskEntry, load_config
from .checks import check_config
from .cells import (DONE, ERROR, EVENTS, LOCK, _checkpoint_step, cell_dir, read_events, result_problem, run_cell,
                    run_cells)
from .index import STATUSES, _pid_alive, status
from .launch import run_sweep
from .collection import aggregate, collect, group_columns, table2

__all__ = [
    "EXECUTORS", "Cell", "ModelEntry", "SweepConfig", "TaskEntry", "load_config",  # config
    "check_config",  # checks
    "DONE", "ERROR", "EVENTS", "LOCK", "cell_dir", "read_events", "result_problem", "run_cell", "run_cells",  # cells
    "STATUSES", "status",  # index
    "run_sweep",  # launch
    "aggregate", "collect", "group_columns", "table2",  # collection
]
