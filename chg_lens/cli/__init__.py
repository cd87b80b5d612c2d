"""The ``chg-lens`` command line, outside the library: it only parses options and calls library functions.

    chg-lens fit                      # SmolLM2 (offline) on IOI, a few minutes on 2 CPU cores
    chg-lens fit --model gpt2 --task ioi --n-seeds 10 --updates 500 --reg-updates 500 --out runs/ioi
    chg-lens tasks                    # the tasks --task accepts

Each subcommand is one module here (``fit``, ``tasks``, ``contrast``, ``sweep``, ``report``, ``ablate``,
``patch``, ``explain``, ``compare``) with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; it is listed in
``COMMANDS`` and imported only when it runs. Options shared by several subcommands, and every
default, live in :mod:`chg_lens.cli.options`. Any error is printed as one ``chg-lens CMD: error:
...`` line with exit status 2, no traceback (``chg-lens --debug CMD ...`` or ``CHG_LENS_DEBUG=1``
shows it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "fit": "fit CHG (G0, G+, G-) on a task and write a results folder",
    "tasks": "list the tasks that --task accepts",
    "contrast": "fit contrastive CHG: keep one data set, remove a matched one; write a results folder",
    "sweep": "run a sweep of CHG fits (models x tasks x seeds x lambdas) on Slurm or locally, resumably",
    "report": "write a self-contained HTML report, head_rankings.csv and a summary from a results folder",
    "ablate": "ablation sweeps: each head alone, sequential, or the paper's Figure 2 test from a CHG result",
    "patch": "activation patching (causal mediation) of every head: IOI, function vectors, ABA/ABB",
    "explain": "explain what attention heads do, score the explanations, cluster them, join CHG roles",
    "compare": "compare CHG, attribution, patching, ablation and random head orders: time, faithfulness, agreement",
}
"""Subcommand name -> one-line help; the module ``chg_lens.cli.<name>`` implements it."""


def subcommand(name: str):
    """The module of subcommand ``name`` (``add_arguments``, ``run``)."""
    return importlib.import_module(f"{__name__}.{name}")


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the subcommand named in ``argv`` (if any) gets its options (and is imported)."""
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    p = argparse.ArgumentParser(prog="chg-lens", description="Causal Head Gating on TransformerLens models")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            subcommand(name).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; an error is one line on stderr and exit status 2 (``--debug`` or
    ``CHG_LENS_DEBUG=1`` raises it with its traceback instead)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(argv).parse_args(argv)
    debug = args.debug or os.environ.get("CHG_LENS_DEBUG", "") not in ("", "0")
    try:
        return subcommand(args.command).run(args)
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
    """The message of an error; for errors that are not the library's own, its type and a pointer
    to ``--debug``."""
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, (ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError)):
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text


if __name__ == "__main__":
    sys.exit(main())
