"""``chg-lens ablate``: each head alone, sequential, or the paper's Figure 2 test from a CHG result.
Writes ``frame.parquet``, ``frame.csv``, ``meta.json`` to ``--out``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..ablation import METHODS

    p.add_argument("--mode", choices=["individual", "sequential", "figure2"], default="individual",
                   help="individual: each head alone; sequential: cumulative in --order; figure2: from --chg")
    p.add_argument("--chg", default=None, help="a saved CHG result folder (figure2; its model/task are the defaults)")
    options.add_model(p, default=None, help=f"default: the CHG result's model, else {options.MODEL}")
    options.add_task(p, default=None, task_help=f"default: the CHG result's task, else {options.TASK}",
                     option_help="any other task argument, e.g. --task-option n_shots=10")
    p.add_argument("--split", choices=["validation", "train"], default="validation", help="rows to score")
    options.add_seed(p, help="task seed, and the random order's seed")
    p.add_argument("--method", choices=list(METHODS), default="zero", help="zero, or mean (mean z over the train split)")
    p.add_argument("--order", default="forward", help="forward, backward, random, or heads 'L.H,L.H,...'")
    p.add_argument("--n-steps", type=int, default=None, help="sequential/figure2: at most this many steps")
    p.add_argument("--chg-seeds", default="each", help="figure2: 'each' or seed numbers '0,2'")
    p.add_argument("--batch-size", type=int, default=options.SCORING_BATCH_SIZE,
                   help=f"rows of data per forward pass (default {options.SCORING_BATCH_SIZE})")
    p.add_argument("--rows-per-pass", "--max-rows-per-pass", dest="rows_per_pass", type=int, default=256,
                   help="at most N rows (configurations x prompts) per forward pass")
    p.add_argument("--no-prefix-reuse", action="store_true")
    options.add_run(p, out=options.OUT["ablate"])


def run(a: argparse.Namespace) -> int:
    from .. import checks, models
    from ..ablation import ORDERS, figure2, head_sweep, sequential_ablation
    from ..chg import CHGResult
    from ..scoring import parse_heads

    t0 = time.time()
    for name in ("batch_size", "rows_per_pass"):
        checks.positive_int(f"--{name.replace('_', '-')}", getattr(a, name))
    if a.n_steps is not None:
        checks.positive_int("--n-steps", a.n_steps)
    options.check_run(a, "ablation")
    result = None
    if a.mode == "figure2":
        if not a.chg:
            raise ValueError("--mode figure2 needs --chg, a saved CHG result folder (chg-lens fit --out DIR)")
        result = CHGResult.load(a.chg)
    meta = result.meta if result is not None else {}
    model_name = a.model or meta.get("model") or options.MODEL
    task = a.task or meta.get("task") or options.TASK
    order: Any = a.order
    if a.order not in ORDERS:
        try:
            order = parse_heads(a.order)
            if not order:
                raise ValueError
        except ValueError:
            raise ValueError(f"--order must be forward, backward, random or 'L.H,L.H'; got {a.order!r}") from None
    seeds: Any = "each" if a.chg_seeds == "each" else [int(s) for s in a.chg_seeds.split(",")]
    task_kwargs = options.task_kwargs(task, a, options.task_options(a.task_option), n=options.n_prompts(a, task))
    model = models.load_model(model_name, device=a.device, dtype=a.dtype)
    from .. import tasks

    train, val = tasks.build(task, model, **task_kwargs)
    data = val if a.split == "validation" else train
    common = dict(method=a.method, reference=train, prefix_reuse=not a.no_prefix_reuse, batch_size=a.batch_size,
                  rows_per_pass=a.rows_per_pass, progress=not a.no_progress, autocast=a.autocast)
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    if a.mode == "individual":
        res = head_sweep(model, data, **common)
        top = res.frame.nsmallest(5, "delta_logprob")
        lines = [f"L{int(r.layer)}H{int(r['head'])} {r.delta_logprob:+.3f}" for _, r in top.iterrows()]
        print("largest drops in target log-prob: " + ", ".join(lines))
    elif a.mode == "sequential":
        res = sequential_ablation(model, data, order=order, n_steps=a.n_steps, seed=a.seed, **common)
        print(res.frame[["step", "layer", "head", "delta_logprob"]].tail(5).to_string(index=False))
    else:
        res = figure2(model, data, result, seeds=seeds, n_steps=a.n_steps, **common)
        print(res.frame.groupby(["score", "step"]).delta_logprob.mean().unstack(0).head(10).to_string())
    res.meta.update(model=model_name, task=task, split=a.split)
    path = res.save(a.out, overwrite=a.overwrite)
    print(f"wrote {path}/ (frame.parquet, frame.csv, meta.json) in {time.time() - t0:.0f}s")
    return 0
