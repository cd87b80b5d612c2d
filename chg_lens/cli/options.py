"""Options shared by the subcommands, and every default in one place.

The shared group: ``--model``, the task options (``--task``, ``--data-dir``, ``--n-prompts``,
``--task-option``), ``--seed``, and the run options (``--device``, ``--dtype``, ``--autocast``,
``--out``, ``--no-progress``). A subcommand calls the ``add_*`` functions it needs; values parsed here never
exit the process: a bad one is a ``ValueError`` (printed by :func:`chg_lens.cli.main`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL = "smollm2-135m-instruct"
"""The model every subcommand runs when ``--model`` is not given (offline, embedded)."""
TASK = "ioi"
IOI_PROMPTS = 160
"""Rows of IOI built when ``--n-prompts`` is not given (fit, ablate); other tasks use their own default."""
FIT_DEFAULTS = dict(n_seeds=2, updates=50, reg_updates=250, batch_size=8, lr=0.5, lr_end=0.05, reg_lr=0.5,
                    reg_lr_end=0.05, checkpoint_every=25)
"""Where ``chg-lens fit`` (and ``make fit``, and ``compare``'s CHG fit) departs from :func:`chg_lens.fit_chg`'s
defaults; every other flag defaults to the library's (:class:`chg_lens.chg.CHGConfig`). A CPU-sized budget,
measured by benchmarks/main_job.py (see benchmarks/README.md). G0 starts at lr 0.5 (the paper: 0.1) so that it
recovers the task from its random start within 50 updates; G+/G- run 250 updates from 0.5 to 0.05 (the paper:
0.5 -> 0.1) so that they settle: on SmolLM2 / IOI this fit reports ``converged`` in about 4 minutes on 2 cores
where bf16 pays (an AMD Zen 5) and about 7.5 minutes in float32 (an Intel Xeon VM, where float32 is faster).
A checkpoint every 25 updates (the library: 50)."""
CONTRAST_DEFAULTS = dict(updates=30, batch_size=8, checkpoint_every=25)
"""Where ``chg-lens contrast`` departs from :func:`chg_lens.fit_contrastive`'s defaults (a smoke-sized
fit: 30 updates of 8 pairs, a checkpoint every 25); every other flag defaults to the library's
(:class:`chg_lens.contrastive.ContrastiveConfig`)."""
SHARED_FIT_FLAGS = ("seed", "autocast", "progress")
"""Fit options whose flags come from the shared group (``--seed`` from :func:`add_seed`, ``--autocast``
and ``--no-progress`` from :func:`add_run`), not from :func:`add_option_flags`."""
SEED = 0
SCORING_BATCH_SIZE = 32
"""``--batch-size`` of ``ablate`` and ``patch``: rows of data per forward pass, the library's default
for every measurement (``scoring.evaluate``, ``score_configs``, the ablation sweeps, ``patch_heads``)."""
OUT = {"fit": "runs/chg", "contrast": "runs/contrast", "ablate": "runs/ablate", "patch": "runs/patch",
       "explain": "runs/explain", "compare": "runs/compare"}
"""Default ``--out`` folder of each subcommand."""


def add_model(p: argparse.ArgumentParser, default: str | None = MODEL, help: str | None = None) -> None:
    p.add_argument("--model", default=default,
                   help=help or "offline alias, .gguf file, local folder or hub name (default: %(default)s)")


def add_task(p: argparse.ArgumentParser, *, default: str | None = TASK, task_help: str | None = None,
             option_help: str = "any other task argument, e.g. --task-option n_shots=10") -> None:
    """``--task``, ``--data-dir``, ``--n-prompts``, ``--task-option``."""
    p.add_argument("--task", default=default, help=task_help or "a task from `chg-lens tasks` (default: %(default)s)")
    add_data(p)
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help=option_help)


def add_data(p: argparse.ArgumentParser, n_prompts: int | None = None,
             data_help: str = "folder with the task's data files") -> None:
    p.add_argument("--data-dir", default=None, help=data_help)
    p.add_argument("--n-prompts", type=int, default=n_prompts,
                   help="rows to build (task default if unset)" if n_prompts is None else "rows to build")


def add_seed(p: argparse.ArgumentParser, help: str = "seed of the task's rows and of the fit") -> None:
    p.add_argument("--seed", type=int, default=SEED, help=help)


AUTOCAST = {"fit": "auto", "measure": "off"}
"""``--autocast`` default per purpose: fits (``fit``, ``contrast``, sweeps) ``auto`` (bf16 mixed precision
where it pays, float32 elsewhere: their objective is stochastic and their diagnostics say how they ended);
measurements (``ablate``, ``patch``, ``explain``, ``compare``'s scoring) ``off``: the model's own dtype, the
same numbers on every machine."""


def add_autocast(p: argparse.ArgumentParser, purpose: str = "measure") -> None:
    """``--autocast auto|bf16|fp16|off`` (see :func:`chg_lens.models.resolve_autocast`), defaulting by
    ``purpose`` (:data:`AUTOCAST`)."""
    if purpose not in AUTOCAST:
        raise ValueError(f"purpose must be one of {tuple(AUTOCAST)}; got {purpose!r}")
    default = AUTOCAST[purpose]
    what = ("auto (default for fits: bf16 mixed precision on CUDA devices and CPUs where bf16 measured faster "
            "than float32, float32 elsewhere), bf16, fp16, or off (the model's own dtype)") if purpose == "fit" else (
            "off (default for measurements: the model's own dtype, the same numbers on every machine), or auto "
            "(bf16 where it pays), bf16, fp16 for large sweeps: faster, less exact (docs/models.md)")
    p.add_argument("--autocast", choices=["auto", "bf16", "fp16", "off"], default=default,
                   help=f"precision of the passes: {what}")


def add_run(p: argparse.ArgumentParser, out: str, purpose: str = "measure") -> None:
    """``--device``, ``--dtype``, ``--autocast`` (default by ``purpose``, :data:`AUTOCAST`), ``--out``
    (default ``out``) and ``--no-progress``."""
    p.add_argument("--device", default=None, help="device to run on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    add_autocast(p, purpose)
    p.add_argument("--out", default=out, help="results folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different result already in --out (default: refuse and say what is there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_run(a: argparse.Namespace, kind: str | None, identity: dict | None = None, out: Path | None = None) -> Path:
    """Check ``--device``, ``--dtype`` and the output folder (``--out``, or ``out``) for a ``kind``
    result before any model is loaded (``kind`` None: only that the folder can be written); returns
    the folder. Raises ValueError."""
    from .. import checks
    from ..results import check_target

    checks.device(a.device)
    checks.dtype(a.dtype)
    out = Path(a.out) if out is None else Path(out)
    if kind is None:
        checks.output_dir(out)
    else:
        check_target(out, kind, identity, overwrite=getattr(a, "overwrite", False), what="--out")
    return out


def task_options(items: list[str] | None) -> dict:
    """``--task-option key=value`` pairs; values are parsed as JSON when they can be."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--task-option expects key=value; got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def n_prompts(a: argparse.Namespace, task: str) -> int | None:
    """``--n-prompts``, or :data:`IOI_PROMPTS` for IOI, else None (the task's default)."""
    return a.n_prompts if a.n_prompts is not None else (IOI_PROMPTS if task == "ioi" else None)


def task_kwargs(task: str, a: argparse.Namespace, options: dict, n: int | None = None) -> dict:
    """The options to pass to ``tasks.build``: ``--seed`` (unless ``options`` sets one), ``--n-prompts``
    (``n`` when given) and ``--data-dir`` (when set), checked (unknown options and values of the wrong
    type are a ValueError) without building anything: call it before loading a model."""
    from .. import tasks

    kwargs = {"seed": a.seed, **options}
    n = n if n is not None else a.n_prompts
    if n is not None:
        kwargs["n_prompts"] = n
    if a.data_dir is not None:
        kwargs["data_dir"] = a.data_dir
    tasks.check_options(task, **kwargs)
    return kwargs


def print_convergence(result) -> None:
    """The last line of a fit's output: the one-line convergence warning (stderr), or that it converged."""
    import sys

    message = result.convergence_warning()
    if message:
        print(f"WARNING: {message}", file=sys.stderr)
    else:
        print("converged: every stage of every seed settled" + (" and G0 kept the task" if hasattr(result, "g0") else ""))


# ----------------------------------------------------------------------------- option sets as flags
def option_flags(sets: tuple, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[str]:
    """The options of the option sets ``sets`` (e.g. ``chg.FIT_OPTIONS``) that :func:`add_option_flags`
    turns into flags: all but ``skip`` (or only ``only``), in declaration order."""
    from .. import options as declared

    return [n for n in declared.names(*sets) if n not in skip and (only is None or n in only)]


def add_option_flags(p, sets: tuple, defaults: dict, *, skip: tuple[str, ...] = (),
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per option of ``sets`` (:func:`option_flags`), generated from its declaration:
    ``n_seeds`` -> ``--n-seeds``, typed as the option (int, float, text; a bool option is a switch:
    ``--name`` when it defaults to false, ``--no-name`` when it defaults to true), its one-line help,
    and its default from ``defaults`` (:data:`FIT_DEFAULTS`, :data:`CONTRAST_DEFAULTS`), else the
    library's. An option with no command-line form (a folder, a data set) must be in ``skip``."""
    from .. import options as declared

    fields = {f.name: f for f in declared.option_fields(*sets)}
    for name in option_flags(sets, skip=skip, only=only):
        kind = declared.value_type(declared.owner(sets, name), name)
        default = defaults.get(name, fields[name].default)
        text = declared.help_of(fields[name]).replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            if default:
                p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", help=f"do not: {text}")
            else:
                p.add_argument(flag, action="store_true", help=text)
        elif kind in (int, float, str):
            p.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
        else:
            raise TypeError(f"option {name} has no command-line form; pass it in skip")


def option_values(a: argparse.Namespace, sets: tuple, *, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None) -> dict:
    """The values of the flags :func:`add_option_flags` added, by option name (for the library call)."""
    return {name: getattr(a, name) for name in option_flags(sets, skip=skip, only=only)}
