"""``chg-lens fit``: fit CHG (G0, G+, G-) on a task and write a results folder."""

from __future__ import annotations

import argparse
import time

from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    options.add_task(p)
    d = options.FIT_DEFAULTS
    p.add_argument("--n-seeds", type=int, default=d["n_seeds"])
    p.add_argument("--updates", type=int, default=d["updates"])
    p.add_argument("--reg-updates", type=int, default=d["reg_updates"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=d["lr"], help="G0 learning rate at the start (default: %(default)s)")
    p.add_argument("--lr-end", type=float, default=d["lr_end"], help="G0 learning rate at the end (default: %(default)s)")
    p.add_argument("--reg-lr", type=float, default=d["reg_lr"], help="G+/G- learning rate at the start (default: %(default)s)")
    p.add_argument("--reg-lr-end", type=float, default=d["reg_lr_end"],
                   help="G+/G- learning rate at the end (default: %(default)s)")
    p.add_argument("--stop-when-settled", action="store_true",
                   help="end a stage once its diagnostics say it settled (--updates/--reg-updates are then the maximum)")
    options.add_seed(p)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (less memory)")
    p.add_argument("--configs-per-pass", type=int, default=None,
                   help="at most N gate configurations per pass (less memory; default: all)")
    options.add_run(p, out=options.OUT["fit"], purpose="fit")
    p.add_argument("--checkpoint-every", type=int, default=25,
                   help="write a resumable checkpoint to OUT/checkpoint every N updates")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT/checkpoint after the fit finished (default: removed once the result is saved)")


def run(a: argparse.Namespace) -> int:
    import shutil
    import warnings
    from dataclasses import asdict

    from .. import models, tasks
    from ..chg import CHGConfig, check_fit_options, fit_chg
    from ..diagnostics import NotConvergedWarning
    from ..store import write_text as write_text_atomic

    # every option and the output folder are checked before the model loads
    fit_options = dict(n_seeds=a.n_seeds, updates=a.updates, reg_updates=a.reg_updates, batch_size=a.batch_size,
                       lam=a.lam, seed=a.seed, grad_accum=a.grad_accum, lr=a.lr, lr_end=a.lr_end, reg_lr=a.reg_lr,
                       reg_lr_end=a.reg_lr_end, stop_when_settled=a.stop_when_settled)
    check_fit_options(**fit_options, configs_per_pass=a.configs_per_pass, checkpoint_every=a.checkpoint_every)
    task_kwargs = options.task_kwargs(a.task, a, options.task_options(a.task_option), n=options.n_prompts(a, a.task))
    out = options.check_run(a, "chg", {"config": asdict(CHGConfig(**fit_options)), "model": a.model})
    options.check_run(a, None, out=out / "checkpoint")
    t0 = time.time()
    model = models.load_model(a.model, device=a.device, dtype=a.dtype)
    train, val = tasks.build(a.task, model, **task_kwargs)
    print(f"loaded {a.model} in {time.time() - t0:.0f}s; task {a.task}: {len(train)} train / {len(val)} validation rows")
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    with warnings.catch_warnings():  # the CLI prints the convergence warning itself, last
        warnings.simplefilter("ignore", NotConvergedWarning)
        result = fit_chg(model, train, **fit_options, configs_per_pass=a.configs_per_pass, validation=val,
                         checkpoint_dir=out / "checkpoint", checkpoint_every=a.checkpoint_every, task=a.task,
                         progress=not a.no_progress, autocast=a.autocast)
    result.meta["model"] = a.model
    result.save(out, overwrite=a.overwrite)
    if not a.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    summary = result.summary()
    write_text_atomic(out / "summary.txt", summary + "\n")
    print(summary)
    print(f"wrote {out}/ (tensors.safetensors, meta.json, scores.csv, summary.txt) in {time.time() - t0:.0f}s")
    options.print_convergence(result)
    return 0
