"""Tasks: each returns :class:`~chg_lens.data.TaskSplits` (train, validation) for a model's tokenizer.

Tasks register themselves by name, so the command line and sweeps find them::

    from chg_lens import tasks
    tasks.list_tasks()                        # name -> one-line description
    train, val = tasks.get_task("ioi")(model, n_prompts=128)
    train, val = tasks.build("ioi", model, n_prompts=128, seed=0)   # options checked by name
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..data import TaskSplits

TaskFn = Callable[..., TaskSplits]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    fn: TaskFn
    description: str


_REGISTRY: dict[str, TaskInfo] = {}


def register(name: str, description: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator: make a task function available as ``name`` (CLI ``--task name``)."""

    def wrap(fn: TaskFn) -> TaskFn:
        _REGISTRY[name] = TaskInfo(name, fn, description)
        return fn

    return wrap


def get_task(name: str) -> TaskFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].fn


def list_tasks() -> dict[str, str]:
    return {n: _REGISTRY[n].description for n in sorted(_REGISTRY)}


def takes(name: str, option: str) -> bool:
    """Whether the task ``name`` accepts the keyword ``option`` (e.g. ``data_dir``)."""
    return option in inspect.signature(get_task(name)).parameters


def build(name: str, model, **options) -> TaskSplits:
    """``(train, validation)`` of the registered task ``name`` for ``model`` (or a tokenizer).

    Options are the task function's keywords (``n_prompts``, ``seed``, ``data_dir``, ...); an
    option the task does not take is a ``ValueError`` that lists the ones it does::

        train, val = tasks.build("fv", model, n_prompts=64, task="antonym", data_dir="../shared/data/function_vectors")
    """
    check_options(name, **options)
    return get_task(name)(model, **options)


def check_options(name: str, **options) -> None:
    """Raise a ``ValueError`` for an option the task ``name`` does not take, or a value whose type
    differs from the option's default (``seed="abc"``, ``n_shots=1.5``), without building anything;
    what :func:`build`, ``chg-lens fit`` and a sweep's pre-submission check run."""
    from .. import checks

    checks.call_options(get_task(name), options, f"task '{name}'")


from .ioi import ioi, ioi_pairs  # noqa: E402  (registers itself)
from .common import few_shot_prompt, load_records  # noqa: E402
from .function_vectors import function_vector, fv_formats, fv_pairs  # noqa: E402
from .symbolic import SYMBOLIC_KINDS, SymbolicRow, aba_abb, aba_abb_dataset, aba_abb_rows, symbolic_pairs  # noqa: E402
from .commonsense import commonsense_qa  # noqa: E402
from .bigbench import bigbench_syntax  # noqa: E402
from .math_cot import math_cot  # noqa: E402
from .induction import induction  # noqa: E402
from .lm import language_modeling  # noqa: E402
from .custom import from_file  # noqa: E402

__all__ = ["register", "get_task", "list_tasks", "build", "takes", "TaskInfo", "ioi", "ioi_pairs", "few_shot_prompt", "load_records",
           "function_vector", "fv_formats", "fv_pairs", "SymbolicRow", "aba_abb", "aba_abb_dataset", "aba_abb_rows",
           "SYMBOLIC_KINDS", "symbolic_pairs",
           "commonsense_qa", "bigbench_syntax", "math_cot", "induction", "language_modeling", "from_file"]
