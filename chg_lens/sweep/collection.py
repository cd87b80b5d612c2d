"""Collection: :func:`collect` joins every finished cell's scores in one long frame
(``OUT/scores.parquet``); :func:`table2` and :func:`aggregate` summarise it per condition
(:func:`group_columns`: model, task, lambda and the varied options).

Example::

    from chg_lens import sweep
    frame = sweep.collect("sweep.yaml")
    sweep.table2(frame)                      # the paper's Table 2 per (model, task, lambda)
"""

from __future__ import annotations

import os

import pandas as pd

from .. import store
from ..deprecation import keyword_only
from .cells import cell_dir
from .config import SweepConfig, load_config
from .index import status

# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------



@keyword_only("require_complete", "write", "converged_only")
def collect(config: "str | os.PathLike | dict | SweepConfig", *, require_complete: bool = False,
            write: bool = True, converged_only: bool = False) -> pd.DataFrame:
    """Every finished cell's scores in one long frame: ``model, task, fit_seed, lam, <varied options>,
    seed, mask, layer, head, g_plus, g_minus, facilitation, interference, irrelevance, role, cell``.

    ``mask`` is the mask index inside a cell's fit and ``seed`` numbers masks across the cells of one
    (model, task, lambda, options) group (``fit_seed * n_seeds + mask``), so
    ``taxonomy.aggregate``/``percent_above`` over a group treat every mask as one seed. Written to
    ``OUT/scores.parquet`` when ``write``. With ``converged_only`` only cells whose fit converged
    (the index's ``converged``) are kept. Example::

        frame = collect("sweep.yaml")
        chg_lens.taxonomy.percent_above(frame, by=("model", "task", "lam"))
    """
    from ..chg import CHGResult

    cfg = load_config(config)
    index = status(cfg, write=write)
    missing = index[index.status != "done"]
    if require_complete and len(missing):
        raise ValueError(f"{len(missing)} of {len(index)} cells are not done: {', '.join(missing.cell[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; run `chg-lens sweep run` again")
    keep = index.status == "done"
    if converged_only:
        keep &= index.converged.eq(True)  # None (not done) is not converged
    frames = []
    for cell in cfg.cells():
        if cell.id not in set(index.loc[keep, "cell"]):
            continue
        result = CHGResult.load(cell_dir(cfg.out, cell) / "result")
        scores = result.scores()
        n = result.n_seeds
        scores = scores.rename(columns={"seed": "mask"})
        scores.insert(2, "fit_seed", cell.seed)
        scores.insert(3, "lam", cell.lam)
        for i, (k, v) in enumerate(sorted(cell.varied.items())):
            scores.insert(4 + i, k, v)
        scores.insert(4 + len(cell.varied), "seed", cell.seed * n + scores["mask"])
        scores["cell"] = cell.id
        frames.append(scores)
    if not frames:
        return pd.DataFrame(columns=["model", "task", "fit_seed", "lam", "seed", "mask", "layer", "head", "g_plus",
                                     "g_minus", "facilitation", "interference", "irrelevance", "role", "cell"])
    frame = pd.concat(frames, ignore_index=True)
    if write:
        store.write_table(frame, cfg.out / "scores.parquet")
    return frame


def group_columns(frame: pd.DataFrame) -> tuple[str, ...]:
    """The columns that name one fitted condition in a collected frame: model, task, lam, varied options."""
    fixed = {"fit_seed", "seed", "mask", "layer", "head", "g_plus", "g_minus", "facilitation", "interference",
             "irrelevance", "role", "cell"}
    return tuple(c for c in frame.columns if c not in fixed)


def table2(frame: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """The paper's Table 2 per condition: percent of heads whose score is >= ``threshold`` always /
    in any seed (all masks of all fit seeds of a condition count as seeds)."""
    from .. import taxonomy

    return taxonomy.percent_above(frame, threshold, by=group_columns(frame))


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Per condition and head: always_* (min over seeds) and any_* (max over seeds), for Figure 3-style plots."""
    from .. import taxonomy

    return taxonomy.aggregate(frame, by=group_columns(frame) + ("layer", "head"))
