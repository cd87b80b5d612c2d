"""The main job's budget: `chg-lens fit` with no arguments (SmolLM2-135M-Instruct on IOI), timed, with
its convergence diagnostics.

    PYTHONPATH=. python benchmarks/main_job.py                       # the CLI defaults
    PYTHONPATH=. python benchmarks/main_job.py --n-seeds 3 --updates 80 --reg-updates 60 --batch-size 16

Prints the fit's wall time, the process's CPU time (on a shared machine, CPU seconds / threads is
close to what the fit takes on an idle one), the load average before and after, the summary, the
diagnostics table and ``converged``; ``--json FILE`` appends one record per run. Uses
``autocast="auto"`` by default, as the CLI (bf16 where it measured faster than float32 on this machine,
see ``models.auto_precision``); ``--autocast bf16`` or ``none`` (float32) fix it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chg_lens  # noqa: E402
from chg_lens.cli.options import FIT_DEFAULTS, IOI_PROMPTS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k in ("n_seeds", "updates", "reg_updates", "batch_size"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=FIT_DEFAULTS[k])
    for k in ("lr", "lr_end", "reg_lr", "reg_lr_end"):
        p.add_argument("--" + k.replace("_", "-"), type=float, default=FIT_DEFAULTS[k])
    p.add_argument("--n-prompts", type=int, default=IOI_PROMPTS)
    p.add_argument("--stop-when-settled", action="store_true")
    p.add_argument("--autocast", default="auto", help="auto (default), bf16 or none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="save the result here")
    p.add_argument("--json", default=None, help="append a record to this JSON-lines file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = chg_lens.load_model("smollm2-135m-instruct")
    train, val = chg_lens.tasks.ioi(model, n_prompts=a.n_prompts)
    load0 = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = chg_lens.fit_chg(model, train, n_seeds=a.n_seeds, updates=a.updates, reg_updates=a.reg_updates,
                              batch_size=a.batch_size, lr=a.lr, lr_end=a.lr_end, reg_lr=a.reg_lr,
                              reg_lr_end=a.reg_lr_end, validation=val, stop_when_settled=a.stop_when_settled,
                              autocast=None if a.autocast == "none" else a.autocast, progress=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    load1 = os.getloadavg()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(result.summary())
    d = result.diagnostics()
    print(d.to_string(index=False))
    record = {"args": vars(a), "n_train": len(train), "n_val": len(val), "fit_wall_s": round(wall, 1),
              "fit_cpu_s": round(cpu, 1), "cpu_s_per_thread": round(cpu / a.threads, 1),
              "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
              "converged": bool(d.attrs["converged"]), "updates_taken": result.updates_taken(),
              "worst_share_moving": {s: float(g.share_moving.max()) for s, g in d.groupby("stage", sort=False)},
              "g0_kept_task": d.loc[d.stage == "g0", "kept_task"].tolist(),
              "agreement": {k: d.attrs[k] for k in ("role_agreement", "spearman_g_plus", "spearman_g_minus")},
              "percent_above": result.percent_above().iloc[0].round(1).to_dict(),
              "validation": result.validation.groupby("gates", sort=False)[["logprob", "accuracy"]].mean()
              .round(4).to_dict("index")}
    print(json.dumps(record))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    if a.out:
        result.save(a.out)


if __name__ == "__main__":
    main()
