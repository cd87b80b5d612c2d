"""``chg-lens contrast``: fit contrastive CHG on two matched data sets and write a results folder.

The paper's Figure 5 (six function-vector tasks, hold one out, both directions) is an experiment, not
a library function: ``python experiments/figure5_contrastive.py`` in a source checkout. The former
``--preset icl-vs-instruction`` fails at once with that command, translated from its options."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import options


FIGURE5 = "python experiments/figure5_contrastive.py"
"""The Figure 5 driver (a script of the source checkout; the installed package does not hold it)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    p.add_argument("--preset", choices=["icl-vs-instruction"], default=None,
                   help=f"moved out of the library: the paper's Figure 5 is `{FIGURE5}` in a source checkout; "
                        "this flag only prints that command for the options given (exit 2)")
    p.add_argument("--retain", help="data to keep: a registered task (`chg-lens tasks`) or a file with prompt, "
                                    "target (and optional pair_id) columns (.json, .jsonl, .csv, .tsv, .parquet)")
    p.add_argument("--forget", help="data to remove, matched row by row with --retain (same task or file kinds)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task argument for both sides, e.g. --task-option task=antonym")
    p.add_argument("--retain-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task argument for --retain only, e.g. --retain-option fmt=instruction")
    p.add_argument("--forget-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task argument for --forget only, e.g. --forget-option fmt=icl")
    p.add_argument("--data-dir", default=None, help="folder with the tasks' data files")
    p.add_argument("--n-prompts", type=int, default=None, help="rows to build per task (task default if unset)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="evaluation share of the rows, in (0, 1): of a file's rows (default 0.2), or passed to a "
                        "registered task as its val_fraction (default: the task's own)")
    p.add_argument("--tasks", default=None, help="--preset only: comma-separated function-vector tasks")
    p.add_argument("--heldout", default=None, help="--preset only: comma-separated held-out tasks")
    p.add_argument("--n-shots", type=int, default=None, help="--preset only: ICL examples per prompt")
    p.add_argument("--chg-retain", default=None, help="a saved CHG result on the retain data: write overlap.csv")
    p.add_argument("--chg-forget", default=None, help="a saved CHG result on the forget data: write overlap.csv")
    options.add_seed(p)
    # every fit option's flag, help and type from ContrastiveConfig / ContrastiveRunOptions; defaults from
    # options.CONTRAST_DEFAULTS
    options.add_option_flags(p, fit_sets(), options.CONTRAST_DEFAULTS, skip=options.SHARED_FIT_FLAGS + NOT_FLAGS)
    options.add_run(p, out=options.OUT["contrast"], purpose="fit")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after the fit finished")


NOT_FLAGS = ("checkpoint_dir", "validation", "one_pass", "check_pairs")
"""fit_contrastive options the command sets itself (OUT/checkpoint, the held-out pairs; the pairs are checked
here, on the whole files first) or leaves at the library's default (one_pass)."""


def fit_sets() -> tuple:
    from ..contrastive import FIT_OPTIONS

    return FIT_OPTIONS


def fit_kwargs(a: argparse.Namespace) -> dict:
    """The fit_contrastive options of the parsed flags."""
    return {**options.option_values(a, fit_sets(), skip=options.SHARED_FIT_FLAGS + NOT_FLAGS),
            "seed": a.seed, "autocast": a.autocast, "progress": not a.no_progress}


def _is_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")


def _side(model, spec: str, opts: dict, a: argparse.Namespace):
    """A file as one TaskDataset (split later, after the pairing check), a task as (train, validation)."""
    from .. import tasks
    from ..contrastive import load_pairs_file

    if _is_file(spec):
        data = load_pairs_file(model, spec)
        return data.subset(range(min(a.n_prompts, len(data)))) if a.n_prompts is not None else data
    return tasks.build(spec, model, **_task_kwargs(spec, opts, a))


def _task_kwargs(spec: str, opts: dict, a: argparse.Namespace) -> dict:
    """The options of a registered task on one side: ``--seed``, ``--n-prompts``, ``--data-dir`` (when
    it takes one), ``--val-fraction`` (when given) and the side's ``--task-option``s, checked."""
    from .. import tasks

    kwargs = {"seed": a.seed, **opts}
    if a.n_prompts is not None:
        kwargs["n_prompts"] = a.n_prompts
    if a.data_dir is not None and tasks.takes(spec, "data_dir"):
        kwargs["data_dir"] = a.data_dir
    if a.val_fraction is not None:
        if not tasks.takes(spec, "val_fraction"):
            raise ValueError(f"--val-fraction: task '{spec}' splits its rows itself (it takes no val_fraction)")
        kwargs["val_fraction"] = a.val_fraction
    tasks.check_options(spec, **kwargs)
    return kwargs


def figure5_command(a: argparse.Namespace) -> str:
    """The ``experiments/figure5_contrastive.py`` command for the options of a former
    ``chg-lens contrast --preset icl-vs-instruction`` call (at the smoke scale, with the options that
    differ from this subcommand's defaults)."""
    import shlex

    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    given = lambda name: getattr(a, name) is not None and getattr(a, name) != default[name]
    args = ["--smoke"] + (["--models", a.model] if given("model") else [])
    for name in ("tasks", "heldout"):
        if given(name):
            args += [f"--{name}", *(t.strip() for t in getattr(a, name).split(",") if t.strip())]
    for name in ("n_shots", "n_prompts", "n_seeds", "updates", "batch_size", "lam", "data_dir", "out"):
        if given(name):
            args += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    if a.no_progress:
        args.append("--no-progress")
    return " ".join([FIGURE5, *map(shlex.quote, args)])


def run(a: argparse.Namespace) -> int:
    import shutil

    if a.preset == "icl-vs-instruction":
        raise ValueError(f"--preset icl-vs-instruction moved out of the library: the Figure 5 driver is now "
                         f"`{FIGURE5}` in a source checkout; for these options run `{figure5_command(a)}` "
                         "(its --help lists the rest; without --smoke it runs the paper's setting)")

    from .. import checks, models
    from ..chg import CHGResult
    from ..contrastive import FIT_OPTIONS, check_matched, facilitation_overlap, fit_contrastive
    import warnings

    from ..data import TaskDataset
    from ..diagnostics import NotConvergedWarning
    from ..options import check_options
    from ..store import write_text as write_text_atomic

    t0 = time.time()
    kw = fit_kwargs(a)
    if not a.retain or not a.forget:
        raise ValueError("give --retain and --forget (a task name or a file each); the paper's Figure 5 is "
                         f"`{FIGURE5}`")
    # every option, input and the output folder are checked before the model loads
    check_options(FIT_OPTIONS, kw, "fit_contrastive")
    for flag, spec in (("--retain", a.retain), ("--forget", a.forget), ("--chg-retain", a.chg_retain),
                       ("--chg-forget", a.chg_forget)):
        if spec and (_is_file(spec) or flag.startswith("--chg")) and not Path(spec).exists():
            raise FileNotFoundError(f"{flag} {spec}: no such file or folder")
    if a.val_fraction is not None:
        v = checks.finite_float("--val-fraction", a.val_fraction)
        if not 0 < v < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), the share of rows held out for evaluation; got {v:g}")
    shared = options.task_options(a.task_option)
    for spec, opts in ((a.retain, a.retain_option), (a.forget, a.forget_option)):
        if not _is_file(spec):
            _task_kwargs(spec, {**shared, **options.task_options(opts)}, a)  # unknown task or bad option: now
    out = options.check_run(a, "contrastive")
    model = models.load_model(a.model, device=a.device, dtype=a.dtype)
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    sides = []
    for spec, opts in ((a.retain, a.retain_option), (a.forget, a.forget_option)):
        sides.append(_side(model, spec, {**shared, **options.task_options(opts)}, a))
    if isinstance(sides[0], TaskDataset) and isinstance(sides[1], TaskDataset):
        check_matched(*sides)  # whole files first: a split would hide a shuffled pairing
    val_fraction = 0.2 if a.val_fraction is None else a.val_fraction
    (r_train, r_val), (f_train, f_val) = [s.split(val_fraction, a.seed) if isinstance(s, TaskDataset) else s
                                          for s in sides]
    check_matched(r_train, f_train)
    check_matched(r_val, f_val)
    print(f"loaded {a.model} in {time.time() - t0:.0f}s; {len(r_train)} train / {len(r_val)} validation pairs")
    with warnings.catch_warnings():  # printed once, last, by options.print_convergence
        warnings.simplefilter("ignore", NotConvergedWarning)
        result = fit_contrastive(model, r_train, f_train, validation=(r_val, f_val), checkpoint_dir=out / "checkpoint",
                                 **kw)
    result.meta.update(model=a.model, retain_spec=a.retain, forget_spec=a.forget)
    chg = {k: CHGResult.load(p) for k, p in (("retain", a.chg_retain), ("forget", a.chg_forget)) if p}
    result.save(out, overwrite=a.overwrite)  # with validation.csv and gates.csv, atomically
    if not a.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if chg:
        write_text_atomic(out / "overlap.csv", facilitation_overlap(result, chg).to_csv(index=False))
    summary = result.summary()
    write_text_atomic(out / "summary.txt", summary + "\n")
    print(summary)
    print(f"wrote {out}/ (tensors.safetensors, meta.json, gates.csv, validation.csv, summary.txt) "
          f"in {time.time() - t0:.0f}s")
    options.print_convergence(result)
    return 0
