"""The ``chg-lens`` command line.

    chg-lens fit                      # SmolLM2 (offline) on IOI, a few minutes on 2 CPU cores
    chg-lens fit --model gpt2 --task ioi --n-seeds 10 --updates 500 --reg-updates 500 --out runs/ioi
    chg-lens tasks                    # the tasks --task accepts

Subcommands are registered in ``COMMANDS``: small ones with ``@command`` here, larger ones with
:func:`delegate`, which imports their module (``add_cli_arguments``, ``run_cli``) only when used.
"""

from __future__ import annotations

import argparse
import inspect
import json
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
    """The options every model-running subcommand shares: ``--device``, ``--dtype``, ``--autocast``,
    ``--out`` (default ``out``) and ``--no-progress``."""
    p.add_argument("--device", default=None, help="device to run on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    add_autocast_option(p)
    p.add_argument("--out", default=out, help="results folder (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_autocast_option(p: argparse.ArgumentParser) -> None:
    """``--autocast auto|bf16|fp16|off`` (default auto: bf16 where the hardware has it natively)."""
    p.add_argument("--autocast", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="precision of the passes: auto (default; bf16 mixed precision on CUDA devices and CPUs "
                        "with native bf16, float32 elsewhere), bf16, fp16, or off (float32)")


def parse_task_options(items: list[str]) -> dict:
    """``--task-option key=value`` pairs; values are parsed as JSON when they can be."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--task-option expects key=value; got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def build_task(model, name: str, n_prompts: int | None, seed: int, data_dir: str | None, options: dict):
    """Call a registered task with the options it accepts; unknown options are an error."""
    from . import tasks

    fn = tasks.get_task(name)
    params = inspect.signature(fn).parameters
    kwargs = dict(options)
    if n_prompts is not None:
        kwargs["n_prompts"] = n_prompts
    kwargs.setdefault("seed", seed)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise SystemExit(f"task '{name}' does not take {', '.join(unknown)}; it takes: "
                         f"{', '.join(p for p in list(params)[1:])}")
    return fn(model, **kwargs)


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

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from . import fit_chg, load_model, models

        n_prompts = a.n_prompts if a.n_prompts is not None else (80 if a.task == "ioi" else None)
        out = Path(a.out)
        t0 = time.time()
        model = load_model(a.model, device=a.device, dtype=a.dtype)
        train, val = build_task(model, a.task, n_prompts, a.seed, a.data_dir, parse_task_options(a.task_option))
        print(f"loaded {a.model} in {time.time() - t0:.0f}s; task {a.task}: {len(train)} train / {len(val)} validation rows")
        print(f"precision: {models.describe_precision(model, a.autocast)}")
        result = fit_chg(model, train, n_seeds=a.n_seeds, updates=a.updates, reg_updates=a.reg_updates,
                         batch_size=a.batch_size, lam=a.lam, seed=a.seed, grad_accum=a.grad_accum,
                         configs_per_pass=a.configs_per_pass, validation=val, checkpoint_dir=out / "checkpoint",
                         checkpoint_every=a.checkpoint_every, task=a.task, progress=not a.no_progress,
                         autocast=a.autocast)
        result.meta["model"] = a.model
        result.save(out)
        summary = result.summary()
        (out / "summary.txt").write_text(summary + "\n")
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

        if a.action == "run":
            index = sweep.run_sweep(a.config, executor=a.executor, wait=not a.no_wait)
        elif a.action == "status":
            index = sweep.status(a.config)
        else:
            frame = sweep.collect(a.config)
            cfg = sweep.load_config(a.config)
            if a.out:
                frame.to_parquet(a.out, index=False) if a.out.endswith(".parquet") else frame.to_csv(a.out, index=False)
            n_cells = frame["cell"].nunique() if len(frame) else 0
            print(f"{len(frame)} rows from {n_cells} finished cell(s) -> {cfg.out / 'scores.parquet'}")
            if len(frame):
                print(sweep.table2(frame).to_string(index=False))
            return 0
        counts = index["status"].value_counts().to_dict()
        print(index[["cell", "status", "attempts", "seconds", "job_id", "error"]].to_string(index=False))
        print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0 if a.action == "status" or set(counts) <= {"done", "queued", "running"} else 1


@command("report", "write a self-contained HTML report, head_rankings.csv and a summary from a results folder")
class Report:
    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("results_dir", help="a CHG results folder (or a folder of them; ablation/patching/"
                       "contrastive CSV or parquet files inside are plotted too)")
        p.add_argument("--out", default=None, help="where to write (default: RESULTS_DIR)")

    @staticmethod
    def run(a: argparse.Namespace) -> int:
        from .report import write_report

        paths = write_report(a.results_dir, a.out)
        print(paths["summary"].read_text(), end="")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0


delegate("ablate", "ablation sweeps: each head alone, sequential, or the paper's Figure 2 test from a CHG result", ".ablation")


delegate("patch", "activation patching (causal mediation) of every head: IOI, function vectors, ABA/ABB", ".patching")


delegate("explain", "explain what attention heads do, score the explanations, cluster them, join CHG roles", ".explain.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chg-lens", description="Causal Head Gating on TransformerLens models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"chg-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
