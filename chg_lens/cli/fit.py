"""``chg-lens fit``: fit CHG (G0, G+, G-) on a task and write a results folder."""

from __future__ import annotations

import argparse
import time

from . import options


NOT_FLAGS = ("checkpoint_dir", "validation", "task")
"""fit_chg options the command sets itself: OUT/checkpoint, the task's held-out rows, --task's name."""


def fit_sets() -> tuple:
    from ..chg import FIT_OPTIONS

    return FIT_OPTIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    options.add_task(p)
    options.add_seed(p)
    # every fit option's flag, help and type from CHGConfig / CHGRunOptions; defaults from options.FIT_DEFAULTS
    options.add_option_flags(p, fit_sets(), options.FIT_DEFAULTS, skip=options.SHARED_FIT_FLAGS + NOT_FLAGS)
    options.add_run(p, out=options.OUT["fit"], purpose="fit")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT/checkpoint after the fit finished (default: removed once the result is saved)")


def fit_kwargs(a: argparse.Namespace) -> dict:
    """The fit_chg options of the parsed flags (all but the data, the checkpoint folder and the task)."""
    return {**options.option_values(a, fit_sets(), skip=options.SHARED_FIT_FLAGS + NOT_FLAGS),
            "seed": a.seed, "autocast": a.autocast, "progress": not a.no_progress}


def run(a: argparse.Namespace) -> int:
    import shutil
    import warnings
    from dataclasses import asdict

    from .. import models, tasks
    from ..chg import CHGConfig, check_fit_options, fit_chg
    from ..diagnostics import NotConvergedWarning
    from ..store import write_text as write_text_atomic

    # every option and the output folder are checked before the model loads
    fit_options = fit_kwargs(a)
    check_fit_options(**fit_options)
    task_kwargs = options.task_kwargs(a.task, a, options.task_options(a.task_option), n=options.n_prompts(a, a.task))
    config = CHGConfig.from_options(**{k: v for k, v in fit_options.items() if k in CHGConfig.__dataclass_fields__})
    out = options.check_run(a, "chg", {"config": asdict(config), "model": a.model})
    options.check_run(a, None, out=out / "checkpoint")
    t0 = time.time()
    model = models.load_model(a.model, device=a.device, dtype=a.dtype)
    train, val = tasks.build(a.task, model, **task_kwargs)
    print(f"loaded {a.model} in {time.time() - t0:.0f}s; task {a.task}: {len(train)} train / {len(val)} validation rows")
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    with warnings.catch_warnings():  # the CLI prints the convergence warning itself, last
        warnings.simplefilter("ignore", NotConvergedWarning)
        result = fit_chg(model, train, **fit_options, validation=val, checkpoint_dir=out / "checkpoint", task=a.task)
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
