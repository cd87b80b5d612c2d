"""``chg-lens patch``: activation patching (causal mediation) of every head: IOI, function vectors, ABA/ABB.
Writes a results folder per corruption (frame.parquet/csv, meta.json, tensors)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import options

PRESETS = ("aba_abb", "fv", "ioi")


def corruptions(task: str) -> tuple[str, ...]:
    """The corruptions of a preset: ioi -> abc, fv -> shuffled, aba_abb -> ``patching.SYMBOLIC_KINDS``."""
    from ..patching import SYMBOLIC_KINDS

    return {"ioi": ("abc",), "fv": ("shuffled",), "aba_abb": SYMBOLIC_KINDS}[task]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..patching import METRICS

    options.add_model(p)
    p.add_argument("--task", choices=PRESETS, default="ioi",
                   help="ioi (ABC corruption), fv (function vectors: answers shuffled), aba_abb (symbolic)")
    p.add_argument("--corruption", default=None,
                   help="ioi: abc; fv: shuffled; aba_abb: abstraction, induction, retrieval or 'all' (default: all)")
    p.add_argument("--fv-task", default="antonym", help="fv: which function-vector task")
    options.add_data(p, n_prompts=32, data_help="fv: the function_vectors data folder")
    options.add_seed(p)
    p.add_argument("--positions", default=None, help="all, last, or token indices '2,-1' (default: the preset's)")
    p.add_argument("--metric", choices=[*METRICS, "auto"], default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=options.SCORING_BATCH_SIZE,
                   help=f"rows of data per forward pass (default {options.SCORING_BATCH_SIZE})")
    p.add_argument("--rows-per-pass", "--max-rows-per-pass", dest="rows_per_pass", type=int, default=256,
                   help="at most N rows (configurations x prompts) per forward pass")
    options.add_run(p, out=options.OUT["patch"])


def run(a: argparse.Namespace) -> int:
    from .. import models
    from ..patching import (function_vector_patching, ioi_patching, patch_heads, symbolic_frame,
                            symbolic_pairs)

    t0 = time.time()
    kinds = corruptions(a.task)
    corruption = a.corruption or ("all" if a.task == "aba_abb" else kinds[0])
    if corruption != "all" and corruption not in kinds:
        raise ValueError(f"--corruption for {a.task} must be one of {kinds}" + (" or all" if a.task == "aba_abb" else ""))
    kw: dict[str, Any] = dict(batch_size=a.batch_size, rows_per_pass=a.rows_per_pass, progress=not a.no_progress,
                              autocast=a.autocast)
    if a.positions is not None:
        kw["positions"] = a.positions if a.positions in ("all", "last") else [int(x) for x in a.positions.split(",")]
    if a.metric is not None:
        kw["metric"] = a.metric
    from .. import checks

    for name in ("n_prompts", "batch_size", "rows_per_pass"):
        checks.positive_int(f"--{name.replace('_', '-')}", getattr(a, name))
    out = Path(a.out)
    names = list(kinds) if a.task == "aba_abb" and corruption == "all" else [corruption]
    for name in names:  # every output folder checked before the model loads
        options.check_run(a, "patching", out=out if len(names) == 1 else out / name)
    model = models.load_model(a.model, device=a.device, dtype=a.dtype)
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    if a.task == "ioi":
        results = {"abc": ioi_patching(model, n_prompts=a.n_prompts, seed=a.seed, **kw)}
    elif a.task == "fv":
        if "positions" in kw:
            raise ValueError("fv patches the last position (Todd et al.); drop --positions")
        results = {"shuffled": function_vector_patching(model, a.fv_task, n_prompts=a.n_prompts, seed=a.seed,
                                                        data_dir=a.data_dir, **kw)}
    else:
        chosen = kinds if corruption == "all" else (corruption,)
        results = {}
        for kind in chosen:
            clean, corrupted, pos = symbolic_pairs(model, kind, a.n_prompts, a.seed)
            opts = {"positions": pos, "metric": "logit_diff", **kw}
            results[kind] = patch_heads(model, clean, corrupted, mediating="significance", **opts)
            results[kind].meta["kind"] = kind
    for name, res in results.items():
        res.meta.update(model=a.model, preset=a.task, corruption=name)
        path = res.save(out if len(results) == 1 else out / name, overwrite=a.overwrite)
        top = res.frame.nlargest(5, "effect")
        print(f"{a.task}/{name}: clean {res.baseline['clean']:.3f}, corrupted {res.baseline['corrupted']:.3f} "
              f"({res.meta['metric']}); top heads: " + ", ".join(
                  f"L{int(r.layer)}H{int(r['head'])} {r.effect:+.3f}" for _, r in top.iterrows())
              + f"; {int(res.frame.mediating.sum())} mediating -> {path}")
    if a.task == "aba_abb" and len(results) > 1:
        from ..store import write_text as write_text_atomic

        write_text_atomic(out / "head_types.csv", symbolic_frame(results).to_csv(index=False))
    print(f"done in {time.time() - t0:.0f}s")
    return 0
