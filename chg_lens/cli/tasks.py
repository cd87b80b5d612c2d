"""``chg-lens tasks``: list the tasks that ``--task`` accepts."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(a: argparse.Namespace) -> int:
    from .. import tasks

    for name, desc in tasks.list_tasks().items():
        print(f"{name:24s} {desc}")
    return 0
