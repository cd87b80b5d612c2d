"""``chg-lens compare``: CHG, attribution patching, activation patching, ablation and random orders on one
task, timed, with their faithfulness curves and agreement, in one results folder.

    chg-lens compare --task ioi --methods chg,attribution,patching,ablation,random --out runs/compare
    chg-lens compare --task ioi --chg runs/chg --out runs/compare          # reuse a saved CHG fit
    chg-lens compare --task induction --methods chg,attribution,ablation,random

IOI: pairs from ``tasks.ioi_pairs`` (ABC corruption) split as ``tasks.ioi`` splits its rows; every
method runs on the train pairs (CHG is fitted on the clean train rows), the faithfulness curves are
scored on the held-out rows. Other tasks have no corrupted twins: attribution is the linearised
effect of mean ablation on the task's own rows, and patching cannot run.
"""

from __future__ import annotations

import argparse
import time

from . import options

FIT_FLAGS = ("n_seeds", "updates", "reg_updates", "batch_size", "lam", "lr", "lr_end", "reg_lr", "reg_lr_end")
"""The CHG fit options offered here (flags, help and types from ``CHGConfig``, defaults from
``options.FIT_DEFAULTS``, as ``chg-lens fit``); ``--seed`` is shared, ``--fit-autocast`` is the fit's precision."""
PAIRED = ("ioi",)
"""Tasks whose rows come with corrupted twins here (``tasks.ioi_pairs``)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..compare import METHODS
    from ..patching import METRICS

    options.add_model(p, default=None, help=f"default: the --chg result's model, else {options.MODEL}")
    options.add_task(p, default=None, task_help=f"a task from `chg-lens tasks` (default: the --chg result's task, "
                                                f"else {options.TASK}); only ioi has corrupted pairs (patching)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    p.add_argument("--chg", default=None, help="a saved CHG result folder to reuse instead of fitting one "
                                               "(chg-lens fit --out DIR); its model and task are the defaults")
    from ..chg import CHGConfig

    fit = p.add_argument_group("CHG fit (when --chg is not given)")
    options.add_option_flags(fit, (CHGConfig,), options.FIT_DEFAULTS, only=FIT_FLAGS)
    fit.add_argument("--fit-autocast", choices=["auto", "bf16", "fp16", "off"], default=options.AUTOCAST["fit"],
                     help="precision of the CHG fit (default: %(default)s, as chg-lens fit); --autocast sets the "
                          "measurements'")
    options.add_seed(p, help="seed of the task's rows, of the held-out split, of the fit and of the random orders")
    p.add_argument("--ablation", choices=["mean", "zero", "corrupted"], default="mean",
                   help="what the heads left out of a curve are set to: mean z over the train rows (default), zero, "
                        "or (ioi) the corrupted twin's z")
    p.add_argument("--metric", choices=[*METRICS, "auto"], default="auto",
                   help="what every method measures (auto: logit difference where the task has answers, else "
                        "target log-prob)")
    p.add_argument("--n-heads", default=None, help="the k grid of the curves, e.g. '0,1,2,4,8,16' "
                                                   "(default: the faithfulness module's grid)")
    p.add_argument("--n-random", type=int, default=5, help="random orders averaged for 'random' (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="heads compared by the top-k overlap (default: %(default)s)")
    p.add_argument("--score-batch-size", type=int, default=options.SCORING_BATCH_SIZE, help="rows per batch of the measurements (default: %(default)s)")
    p.add_argument("--rows-per-pass", type=int, default=256,
                   help="at most N rows (configurations x prompts) per forward pass of the measurements")
    options.add_run(p, out=options.OUT["compare"], purpose="measure")


def methods_of(a: argparse.Namespace, task: str) -> list[str]:
    """``--methods`` checked against the task, before anything loads."""
    from ..compare import NEEDS_PAIRS, check_methods

    names = check_methods(a.methods, None)
    paired = [m for m in names if m in NEEDS_PAIRS]
    if paired and task not in PAIRED:
        raise ValueError(f"--methods {','.join(paired)} needs corrupted pairs, which only --task "
                         f"{' or '.join(PAIRED)} has here; drop it for --task {task}")
    if a.ablation == "corrupted" and task not in PAIRED:
        raise ValueError(f"--ablation corrupted needs corrupted pairs (--task {' or '.join(PAIRED)}); use mean or zero")
    return names


def grid(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--n-heads must be comma-separated whole numbers, e.g. 0,1,2,4,8; got {text!r}") from None


def run(a: argparse.Namespace) -> int:
    import warnings

    from .. import checks, models, tasks
    from ..chg import CHGConfig, CHGResult, check_fit_options
    from ..compare import compare_methods, split_pairs
    from ..diagnostics import NotConvergedWarning
    from ..results import write_text_atomic

    t0 = time.time()
    # every option, the reused fit and the output folder are checked before the model loads
    chg = CHGResult.load(a.chg) if a.chg else None
    meta = chg.meta if chg is not None else {}
    model_name = a.model or meta.get("model") or options.MODEL
    task = a.task or meta.get("task") or options.TASK
    if chg is not None:
        for what, mine, theirs in (("model", model_name, meta.get("model")), ("task", task, meta.get("task"))):
            if theirs is not None and mine != theirs:
                raise ValueError(f"--chg {a.chg} was fitted with {what} {theirs!r}, not {mine!r}; pass --{what} "
                                 f"{theirs} or another fit")
    names = methods_of(a, task)
    if chg is not None and "chg" not in names:
        raise ValueError("--chg gives a fit to reuse, but chg is not in --methods; add it or drop --chg")
    fit_options = dict(options.option_values(a, (CHGConfig,), only=FIT_FLAGS), seed=a.seed, autocast=a.fit_autocast,
                       task=task)
    if chg is None and "chg" in names:
        check_fit_options(**fit_options)
    for name in ("n_random", "top_k", "score_batch_size", "rows_per_pass"):
        checks.positive_int(f"--{name.replace('_', '-')}", getattr(a, name))
    n_heads = grid(a.n_heads)
    task_options = options.task_options(a.task_option)
    task_kwargs = options.task_kwargs(task, a, task_options, n=options.n_prompts(a, task))
    out = options.check_run(a, "comparison", {"model": model_name, "task": task, "methods": names})

    model = models.load_model(model_name, device=a.device, dtype=a.dtype)
    print(f"precision: measurements {models.describe_precision(model, a.autocast)}"
          + (f"; CHG fit {models.describe_precision(model, a.fit_autocast)}" if chg is None and "chg" in names else ""))
    corrupted = held_corrupted = None
    if task in PAIRED:  # the pairs' clean rows split exactly as tasks.ioi splits them
        import inspect

        split = task_kwargs.pop("val_fraction", inspect.signature(tasks.ioi).parameters["val_fraction"].default)
        train_pairs, held_pairs = split_pairs(*tasks.ioi_pairs(model, **task_kwargs), split, a.seed)
        train, corrupted = train_pairs
        held, held_corrupted = held_pairs
    else:
        train, held = tasks.build(task, model, **task_kwargs)
    print(f"task {task}: {len(train)} rows for the methods" + (" (with corrupted twins)" if corrupted is not None else "")
          + f", {len(held)} held out for the curves")
    if chg is not None and meta.get("data_fingerprint") not in (None, train.fingerprint()):
        print(f"note: the reused fit {a.chg} was fitted on other rows than these {len(train)} (another --n-prompts, "
              "--seed or split); its ranking is compared as it is")
    with warnings.catch_warnings():  # the CLI prints the fit's convergence warning itself, last
        warnings.simplefilter("ignore", NotConvergedWarning)
        cmp = compare_methods(model, train, corrupted=corrupted, validation=held, methods=names, chg=chg,
                              fit_options=fit_options if chg is None else None,
                              ablation=held_corrupted if a.ablation == "corrupted" else a.ablation,
                              metric=a.metric, n_heads=n_heads, n_random=a.n_random, top_k=a.top_k, seed=a.seed,
                              batch_size=a.score_batch_size, rows_per_pass=a.rows_per_pass,
                              progress=not a.no_progress, autocast=a.autocast)
    cmp.meta.update(model=model_name, task=task)
    fitted = cmp.results.get("chg") if chg is None else None
    if fitted is not None:
        fitted.meta["model"] = model_name
    path = cmp.save(out, overwrite=a.overwrite)
    summary = cmp.summary()
    write_text_atomic(out / "summary.txt", summary + "\n")
    print(summary)
    print(f"wrote {path}/ (comparison.csv, comparison.json, agreement.csv, faithfulness.html, summary.txt, one "
          f"folder per method, faithfulness/) in {time.time() - t0:.0f}s")
    if fitted is not None:
        options.print_convergence(fitted)
    return 0
