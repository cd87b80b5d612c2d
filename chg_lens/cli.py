"""The ``chg-lens`` command line.

    chg-lens fit                      # SmolLM2 (offline) on IOI, a few minutes on 2 CPU cores
    chg-lens fit --model gpt2 --task ioi --n-seeds 10 --updates 500 --reg-updates 500 --out runs/ioi
    chg-lens tasks                    # the tasks --task accepts

Subcommands are registered in ``COMMANDS``: small ones with ``@command`` here, larger ones with
:func:`delegate`, which imports their module (``add_cli_arguments``, ``run_cli``) only when used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    """Register ``(add_arguments, run)`` under ``name``; used as ``@command(...)`` on a pair holder."""

    def wrap(pair):
        COMMANDS[name] = (pair.add_arguments, pair.run, help)
        return pair

    return wrap


def delegate(name: str, help: str, module: str) -> None:
    """Register a subcommand whose ``add_cli_arguments(parser)`` and ``run_cli(args)`` live in
    ``module`` (relative to chg_lens), imported only when that subcommand is used."""
    import importlib

    load = lambda: importlib.import_module(module, __package__)
    COMMANDS[name] = (lambda p: load().add_cli_arguments(p), lambda a: load().run_cli(a), help)


def add_run_options(p: argparse.ArgumentParser, out: str) -> None:
    """The options every model-running subcommand shares: ``--device``, ``--dtype``, ``--out``
    (default ``out``) and ``--no-progress``."""
    p.add_argument("--device", default=None, help="device to run on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--out", default=out, help="results folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different result already in --out (default: refuse and say what is there)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_run_options(a: argparse.Namespace, kind: str | None, identity: dict | None = None,
                      out: Path | None = None) -> Path:
    """Check ``--device``, ``--dtype`` and the ``--out`` folder (for a ``kind`` result) before any
    model is loaded; returns the output folder. Raises ValueError (never exits)."""
    from . import checks
    from .results import check_target

    checks.device(a.device)
    checks.dtype(a.dtype)
    out = Path(a.out) if out is None else out
    if kind is None:
        checks.output_dir(out)
    else:
        check_target(out, kind, identity, overwrite=getattr(a, "overwrite", False), what="--out")
    return out


def parse_task_options(items: list[str]) -> dict:
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


def build_task(model, name: str, n_prompts: int | None, seed: int, data_dir: str | None, options: dict):
    """Call a registered task with the options it accepts; unknown options are an error."""
    from . import tasks

    kwargs = task_kwargs(name, n_prompts, seed, data_dir, options)
    return tasks.get_task(name)(model, **kwargs)


def task_kwargs(name: str, n_prompts: int | None, seed: int, data_dir: str | None, options: dict) -> dict:
    """The keyword arguments :func:`build_task` passes to task ``name``, checked (unknown options
    and values of the wrong type are a ValueError) without building anything."""
    from . import checks, tasks

    fn = tasks.get_task(name)
    kwargs = dict(options)
    if n_prompts is not None:
        kwargs["n_prompts"] = n_prompts
    kwargs.setdefault("seed", seed)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    checks.call_options(fn, kwargs, f"task '{name}'")
    return kwargs


@command("fit", "fit CHG (G0, G+, G-) on a task and write a results folder")
class Fit:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2-135m-instruct",
                       help="offline alias, .gguf file, local folder or hub name (default: %(default)s)")
        p.add_argument("--task", default="ioi", help="a task from `chg-lens tasks` (default: %(default)s)")
        p.add_argument("--data-dir", default=None, help="folder with the task's data files")
        p.add_argument("--n-prompts", type=int, default=None, help="rows to build (task default if unset)")
        p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other task argument, e.g. --task-option n_shots=10")
        p.add_argument("--n-seeds", type=int, default=2)
        p.add_argument("--updates", type=int, default=30)
        p.add_argument("--reg-updates", type=int, default=30)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lam", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update (less memory)")
        p.add_argument("--configs-per-pass", type=int, default=None,
                       help="at most N gate configurations per pass (less memory; default: all)")
        add_run_options(p, out="runs/chg")
        p.add_argument("--checkpoint-every", type=int, default=25,
                       help="write a resumable checkpoint to OUT/checkpoint every N updates")
        p.add_argument("--keep-checkpoint", action="store_true",
                       help="keep OUT/checkpoint after the fit finished (default: removed once the result is saved)")

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from dataclasses import asdict

        from . import fit_chg, load_model
        from .chg import CHGConfig, check_fit_options
        from .results import write_text_atomic

        n_prompts = a.n_prompts if a.n_prompts is not None else (80 if a.task == "ioi" else None)
        fit_options = dict(n_seeds=a.n_seeds, updates=a.updates, reg_updates=a.reg_updates, batch_size=a.batch_size,
                           lam=a.lam, seed=a.seed, grad_accum=a.grad_accum)
        check_fit_options(**fit_options, configs_per_pass=a.configs_per_pass, checkpoint_every=a.checkpoint_every)
        options = task_kwargs(a.task, n_prompts, a.seed, a.data_dir, parse_task_options(a.task_option))
        out = check_run_options(a, "chg", {"config": asdict(CHGConfig(**fit_options)), "model": a.model})
        check_run_options(a, None, out=out / "checkpoint")
        t0 = time.time()
        model = load_model(a.model, device=a.device, dtype=a.dtype)
        train, val = build_task(model, a.task, None, a.seed, None, options)
        print(f"loaded {a.model} in {time.time() - t0:.0f}s; task {a.task}: {len(train)} train / {len(val)} validation rows")
        result = fit_chg(model, train, n_seeds=a.n_seeds, updates=a.updates, reg_updates=a.reg_updates,
                         batch_size=a.batch_size, lam=a.lam, seed=a.seed, grad_accum=a.grad_accum,
                         configs_per_pass=a.configs_per_pass, validation=val, checkpoint_dir=out / "checkpoint",
                         checkpoint_every=a.checkpoint_every, task=a.task, progress=not a.no_progress)
        result.meta["model"] = a.model
        result.save(out, overwrite=a.overwrite)
        if not a.keep_checkpoint:
            import shutil

            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        summary = result.summary()
        write_text_atomic(out / "summary.txt", summary + "\n")
        print(summary)
        print(f"wrote {out}/ (tensors.safetensors, meta.json, scores.csv, summary.txt) in {time.time() - t0:.0f}s")
        return 0


@command("tasks", "list the tasks that --task accepts")
class Tasks:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from . import tasks

        for name, desc in tasks.list_tasks().items():
            print(f"{name:24s} {desc}")
        return 0


delegate("contrast", "fit contrastive CHG: keep one data set, remove a matched one; write a results folder", ".contrastive")


@command("sweep", "run a sweep of CHG fits (models x tasks x seeds x lambdas) on Slurm or locally, resumably")
class Sweep:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("action", choices=["run", "status", "collect"],
                       help="run: submit what is not done (and wait); status: the index; collect: scores of finished cells")
        p.add_argument("config", help="sweep config (.yaml, .toml or .py); see docs/sweeps.md")
        p.add_argument("--executor", choices=["local", "slurm", "debug"], default=None,
                       help="override the config's executor.kind")
        p.add_argument("--no-wait", action="store_true", help="run: return once the jobs are submitted")
        p.add_argument("--out", default=None, help="collect: also write the frame to this .parquet or .csv file")

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from . import sweep

        if a.out:
            _check_table_path(a.out)
        if a.action == "run":
            index = sweep.run_sweep(a.config, executor=a.executor, wait=not a.no_wait)
        elif a.action == "status":
            index = sweep.status(a.config)
        else:
            frame = sweep.collect(a.config)
            cfg = sweep.load_config(a.config)
            if a.out:
                _write_table(frame, Path(a.out))
            n_cells = frame["cell"].nunique() if len(frame) else 0
            print(f"{len(frame)} rows from {n_cells} finished cell(s) -> {cfg.out / 'scores.parquet'}")
            if len(frame):
                print(sweep.table2(frame).to_string(index=False))
            return 0
        counts = index["status"].value_counts().to_dict()
        if a.action == "run" and a.no_wait and counts.get("running", 0) + counts.get("queued", 0):
            print(f"{counts.get('running', 0) + counts.get('queued', 0)} cell(s) are still queued or running; "
                  "`chg-lens sweep status CONFIG` follows them", file=sys.stderr)
        print(index[["cell", "status", "attempts", "seconds", "job_id", "error"]].to_string(index=False))
        print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0 if a.action == "status" or set(counts) <= {"done", "queued", "running"} else 1


def _check_table_path(path: str) -> None:
    from . import checks

    p = Path(path)
    if p.suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out {path}: give a .parquet or .csv file name")
    if p.is_dir():
        raise ValueError(f"--out {path} is a folder; give a .parquet or .csv file name")
    checks.output_dir(p.parent, "--out's folder")


def _write_table(frame, path: Path) -> None:
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    frame.to_parquet(tmp, index=False) if path.suffix == ".parquet" else frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


@command("report", "write a self-contained HTML report, head_rankings.csv and a summary from a results folder")
class Report:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("results_dir", help="a CHG results folder (or a folder of them; ablation/patching/"
                       "contrastive CSV or parquet files inside are plotted too)")
        p.add_argument("--out", default=None, help="where to write (default: RESULTS_DIR)")
        p.add_argument("--allow-skipped", action="store_true",
                       help="exit 0 even when some results or tables could not be read (they are listed either way)")

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from . import checks
        from .report import write_report

        if a.out is not None:
            checks.output_dir(a.out)
        paths = write_report(a.results_dir, a.out)
        skipped = getattr(paths, "skipped", [])
        print(paths["summary"].read_text(), end="")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        for where, why in skipped:
            print(f"chg-lens report: skipped {where}: {why}", file=sys.stderr)
        if skipped and not a.allow_skipped:
            print(f"chg-lens report: {len(skipped)} item(s) skipped; fix or remove them, or pass --allow-skipped",
                  file=sys.stderr)
            return 1
        return 0


delegate("ablate", "ablation sweeps: each head alone, sequential, or the paper's Figure 2 test from a CHG result", ".ablation")


delegate("patch", "activation patching (causal mediation) of every head: IOI, function vectors, ABA/ABB", ".patching")


delegate("explain", "explain what attention heads do, score the explanations, cluster them, join CHG roles", ".explain.cli")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an error is one line on stderr and exit code 2 (``--debug`` or
    ``CHG_LENS_DEBUG=1`` shows the traceback instead)."""
    parser = argparse.ArgumentParser(prog="chg-lens", description="Causal Head Gating on TransformerLens models")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("CHG_LENS_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"chg-lens {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback; --debug shows it
        if debug:
            raise
        print(f"chg-lens {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


def error_line(err: BaseException) -> str:
    """One line for an error: its message (the exception type for errors that are not ours), and
    a pointer to ``--debug``."""
    text = str(err).strip() or type(err).__name__
    ours = isinstance(err, (ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError))
    if not ours:
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text


if __name__ == "__main__":
    sys.exit(main())
