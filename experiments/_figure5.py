"""The Figure 5 driver: contrastive CHG on six function-vector tasks, one held out at a time, both
directions (forget ICL / forget instruction), scored on the held-out task in both formats.

Built from the library's general pieces (:func:`chg_lens.contrastive.fit_contrastive`, its stored
evaluation, :func:`chg_lens.results.cached`); ``figure5_contrastive.py`` calls it and writes the
figure. It lived in ``chg_lens.contrastive`` until the architecture issue (#17) moved it here::

    import sys; sys.path.insert(0, "experiments")
    from _figure5 import icl_vs_instruction
    frame = icl_vs_instruction(model, data_dir="../shared/data/function_vectors", heldout=["antonym"],
                               n_prompts=32, updates=20, batch_size=8, out_dir="outputs/fig5")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from chg_lens import models  # noqa: E402
from chg_lens.contrastive import ContrastiveResult, fit_contrastive  # noqa: E402
from chg_lens.data import TaskDataset, concat  # noqa: E402
from chg_lens.results import cached  # noqa: E402
from chg_lens.stats import wilson_interval  # noqa: E402

SIX_TASKS = ("antonym", "capitalize", "country-capital", "english-french", "present-past", "singular-plural")
DIRECTIONS = ("forget_icl", "forget_instruction")
"""``forget_icl``: retain the instruction format, forget ICL; ``forget_instruction``: the reverse."""


def direction_roles(direction: str) -> tuple[str, str]:
    """``(retained format, forgotten format)`` of a direction: ``forget_icl`` -> ``("instruction", "icl")``."""
    if direction == "forget_icl":
        return "instruction", "icl"
    if direction == "forget_instruction":
        return "icl", "instruction"
    raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")


def icl_vs_instruction(
    model: Any,
    tasks: Sequence[str] = SIX_TASKS,
    data_dir: Any = None,
    heldout: Iterable[str] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    n_prompts: int = 256,
    n_eval: int | None = None,
    n_shots: int = 10,
    n_seeds: int = 1,
    updates: int = 500,
    batch_size: int = 64,
    lam: float = 0.1,
    max_diff: float = 5.0,
    lr: float = 0.1,
    lr_end: float = 0.01,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """The paper's Figure 5: for each held-out task and direction, fit contrastive CHG on the other
    tasks (forget one format, retain the other) and score the held-out task in both formats, with
    and without the gates.

    ``n_prompts`` queries per training task and ``n_eval`` (default ``n_prompts``) for the held-out
    task, built by ``fv_formats`` (``n_shots``-shot ICL and instruction + one example, row-matched).
    With ``out_dir`` each fit is saved to ``out_dir/fits/<direction>__<task>/`` (with a checkpoint
    while it runs), and a second call skips finished fits and resumes a cut one.

    Returns the frame for the plot: direction, heldout_task, format (icl|instruction), gates
    (default|gated), accuracy, ci_low, ci_high (95% Wilson), n. With several seeds the held-out rows
    of every seed are pooled (n = rows x seeds).

    Example::

        frame = icl_vs_instruction(model, data_dir="../shared/data/function_vectors", heldout=["antonym"],
                                   n_prompts=32, updates=20, batch_size=8)
    """
    from chg_lens.tasks.function_vectors import fv_formats

    tasks = list(tasks)
    heldout = list(tasks if heldout is None else heldout)
    for d in directions:
        direction_roles(d)
    unknown = [t for t in heldout if t not in tasks]
    if unknown:
        raise ValueError(f"held-out task(s) {unknown} are not among tasks {tasks}")
    if len(tasks) < 2:
        raise ValueError("need at least two tasks: fit on the others, evaluate on the held-out one")
    model = models.as_model(model)
    cache: dict[tuple[str, int], dict[str, TaskDataset]] = {}

    def formats(task: str, n: int) -> dict[str, TaskDataset]:
        if (task, n) not in cache:
            cache[(task, n)] = fv_formats(model, task, n_prompts=n, n_shots=n_shots, seed=seed, data_dir=data_dir)
        return cache[(task, n)]

    formats(heldout[0], n_eval or n_prompts)  # bad data_dir / task names fail here, before any fit
    frames = []
    for task in heldout:
        train = {f: concat([formats(t, n_prompts)[f] for t in tasks if t != task], name=f"fv_{f}_without_{task}")
                 for f in ("icl", "instruction")}
        ev = formats(task, n_eval or n_prompts)
        for direction in directions:
            keep, drop = direction_roles(direction)
            folder = None if out_dir is None else Path(out_dir) / "fits" / f"{direction}__{task}"

            def fit(folder: Path | None, keep=keep, drop=drop, direction=direction, task=task) -> ContrastiveResult:
                result = fit_contrastive(
                    model, train[keep], train[drop], n_seeds=n_seeds, updates=updates, batch_size=batch_size,
                    lam=lam, max_diff=max_diff, lr=lr, lr_end=lr_end, seed=seed, validation=(ev[keep], ev[drop]),
                    checkpoint_dir=None if folder is None else folder / "checkpoint", progress=progress,
                    **fit_kwargs)
                result.meta.update(direction=direction, heldout_task=task, tasks=tasks)
                return result

            if folder is None:
                result = fit(None)
            else:
                key = dict(n_seeds=n_seeds, updates=updates, batch_size=batch_size, lam=lam, max_diff=max_diff,
                           lr=lr, lr_end=lr_end, seed=seed)
                key["training data"] = [train[keep].fingerprint(), train[drop].fingerprint()]
                key["evaluation data"] = [ev[keep].fingerprint(), ev[drop].fingerprint()]
                result = cached(folder, key, fit, kind="contrastive")
            frames.append(figure5_rows(result, direction, task))
    return pd.concat(frames, ignore_index=True)


def figure5_rows(result: ContrastiveResult, direction: str, task: str) -> pd.DataFrame:
    """Figure 5 rows of one fit from its stored evaluation (seeds pooled): direction, heldout_task,
    format, gates, accuracy, ci_low, ci_high, n.

    Example: ``figure5_rows(ContrastiveResult.load(folder), "forget_icl", "antonym")``.
    """
    if result.validation is None:
        raise ValueError("the result has no validation; fit with validation=(retain_eval, forget_eval)")
    keep, drop = direction_roles(direction)
    ev = result.validation
    rows = []
    for variant, fmt in (("retain", keep), ("forget", drop)):
        for gates in ("default", "gated"):
            part = ev[(ev["variant"] == variant) & (ev["gates"] == gates)]
            n = int(part["n"].sum())
            k = int(round(float((part["accuracy"] * part["n"]).sum())))
            lo, hi = wilson_interval(k, n)
            rows.append({"direction": direction, "heldout_task": task, "format": fmt, "gates": gates,
                         "accuracy": k / n, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows)
