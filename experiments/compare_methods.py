"""Method comparison on IOI (issue 26): CHG at 2 and at 10 seeds, attribution patching, activation patching,
single-head mean ablation and random orders, for SmolLM2-135M-Instruct and Gemma-3-270m: per method the wall
time to rank the heads, CPR and CMD of its faithfulness curve on held-out prompts, and its Spearman rank
correlation (and top-10 overlap) with activation patching.

    python experiments/compare_methods.py --smoke                  # SmolLM2, 20 IOI prompts, a tiny CHG budget (CPU)
    python experiments/compare_methods.py                          # both models, 160 prompts, chg-lens fit's budget
    python experiments/compare_methods.py --write-readme           # and put the table into experiments/README.md
    python experiments/compare_methods.py --seed-counts 2,4,10     # other CHG seed counts
    python experiments/compare_methods.py --rank-pairs 32          # the other methods rank from 32 train pairs

Every method runs on the same IOI train pairs (`tasks.ioi_pairs`, ABC corruption, split as `tasks.ioi` splits
its rows: CHG is fitted on exactly `tasks.ioi`'s train rows); the curves are scored on the held-out 20%. CHG fits
are cached (`results.cached`) in ``OUT/fits/<model>/ioi/compare-<hash>/`` and each model's comparison in
``OUT/compare_methods/<model>/`` (`chg-lens report` opens it); a rerun loads both. A reused fit's time is the
time the fit itself took. Gemma-3-270m needs TransformerLens 4 (skipped, with a note, on 3.x). Nothing is tuned
per method: each runs with the library's defaults, and the CHG budget is `chg-lens fit`'s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
from pathlib import Path

import pandas as pd
import torch

from _common import Config, Timer, load, parse, write_frame

import chg_lens
from chg_lens import compare, models, results
from chg_lens.cli.options import FIT_DEFAULTS  # the CHG budget of `chg-lens fit` (one place for it)

FIT = {k: FIT_DEFAULTS[k] for k in ("updates", "reg_updates", "batch_size")}
RATES = {k: FIT_DEFAULTS[k] for k in ("lr", "lr_end", "reg_lr", "reg_lr_end")}
SMOKE = Config(tasks=["ioi"], n_seeds=10, updates=4, reg_updates=4, batch_size=8, n_prompts=20,
               extra={"seed_counts": [2, 10], "n_random": 5, **RATES})
FULL = Config(models=["smollm2-135m-instruct", "gemma-3-270m"], tasks=["ioi"], n_seeds=10, n_prompts=160,
              extra={"seed_counts": [2, 10], "n_random": 5, **RATES}, **FIT)
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- compare_methods table: start -->", "<!-- compare_methods table: end -->"
COLUMNS = ["model", "method", "seconds", "cpr", "cmd", "spearman_vs_patching", "top10_vs_patching", "note"]


def script_args(argv):
    """This script's own options; the rest goes to ``_common.parse``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--seed-counts", default=None, help="CHG seed counts, comma-separated (default: 2,10)")
    p.add_argument("--model-seed-counts", action="append", default=[], metavar="MODEL=COUNTS",
                   help="CHG seed counts for one model, e.g. gemma-3-270m=2 (repeatable; others use --seed-counts)")
    p.add_argument("--write-readme", action="store_true", help="put the table into experiments/README.md")
    p.add_argument("--rank-pairs", type=int, default=None,
                   help="rank heads by attribution, patching and ablation from the first N train pairs (default: all; "
                        "CHG always fits on every train row)")
    return p.parse_known_args(argv)


def chg_fit(out: Path, cfg: Config, model_name: str, train, held, n_seeds: int, progress: bool):
    """The CHG fit with ``n_seeds`` seeds on the train rows, cached by its settings."""
    key = {"n_seeds": n_seeds, "updates": cfg.updates, "reg_updates": cfg.reg_updates, "batch_size": cfg.batch_size,
           "lam": cfg.lam, "n_prompts": cfg.n_prompts, "data": train.fingerprint(),
           **{k: cfg.extra[k] for k in RATES}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = out.parent / "fits" / _slug(model_name) / "ioi" / f"compare-{digest}"

    def fit(folder: Path):
        result = chg_lens.fit_chg(load(model_name), train, n_seeds=n_seeds, updates=cfg.updates,
                                  reg_updates=cfg.reg_updates, batch_size=cfg.batch_size, lam=cfg.lam,
                                  validation=held, task="ioi", checkpoint_dir=folder / "checkpoint", progress=progress,
                                  **{k: cfg.extra[k] for k in RATES})
        result.meta["model"] = model_name
        return result

    return results.cached(folder, key, fit)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(text).name or text)


def compare_model(out: Path, cfg: Config, model_name: str, seed_counts: list[int], progress: bool,
                  rank_pairs: int | None = None):
    """One model's comparison (cached in ``out/<model>``) and its rows of the table; ``rank_pairs``: the
    other methods rank heads from the first that many train pairs (None: all of them)."""
    model = load(model_name)
    clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=cfg.n_prompts, seed=0)
    train, held = compare.split_pairs(clean, corrupted, 0.2, 0)
    fits = {f"chg_{s}_seeds": chg_fit(out, cfg, model_name, train.clean, held.clean, s, progress) for s in seed_counts}
    rank = train if rank_pairs is None else compare.Pairs(*(d.subset(torch.arange(min(rank_pairs, len(d))))
                                                           for d in (train.clean, train.corrupted)))
    key = {"n_prompts": cfg.n_prompts, "seed_counts": seed_counts, "n_random": cfg.extra["n_random"],
           "fits": {name: fit.identity() for name, fit in fits.items()}}
    if rank_pairs is not None:
        key["rank_pairs"] = len(rank.clean)

    def run(folder: Path):
        cmp = compare.compare_methods(model, rank.clean, corrupted=rank.corrupted, validation=held.clean,
                                      chg=fits, n_random=cfg.extra["n_random"], progress=progress)
        cmp.meta["model"] = model_name
        return cmp

    cmp = results.cached(out / _slug(model_name), key, run)
    table = cmp.table()
    table.insert(0, "model", model_name)
    notes = []
    for method in table["method"]:
        fit = cmp.results.get(method)
        if method in fits:
            notes.append(f"{fit.n_seeds} seeds, {fit.config['updates']} + {fit.config['reg_updates']} updates, "
                         f"{'converged' if fit.converged else 'NOT converged'}")
        elif method == "random":
            notes.append(f"mean of {cmp.meta['n_random']} orders")
        else:
            notes.append("")
    table["note"] = notes
    return cmp, table


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (numbers to 3 decimals, seconds to 1)."""
    cols = [c for c in COLUMNS if c in table.columns]
    fmt = {"seconds": "{:.1f}", "cpr": "{:.3f}", "cmd": "{:.3f}", "spearman_vs_patching": "{:.3f}",
           "top10_vs_patching": "{:.2f}"}
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" if c in ("model", "method", "note") else "---:"
                                                            for c in cols) + " |"]
    for rec in table[cols].to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            cells.append("" if v is None or (isinstance(v, float) and v != v) else fmt.get(c, "{}").format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, TransformerLens {models.TL_VERSION}; "
            f"native bf16 on the CPU: {models.cpu_native_bf16()}; "
            f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def write_readme(text: str, readme: Path = README) -> None:
    """Put ``text`` between the markers in experiments/README.md (everything else is kept)."""
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no compare_methods markers ({START} ... {END})")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> None:
    own, rest = script_args(argv)
    args, cfg, out = parse("compare_methods", __doc__, SMOKE, FULL, rest)
    seed_counts = ([int(s) for s in own.seed_counts.split(",")] if own.seed_counts
                   else list(cfg.extra["seed_counts"]))
    per_model = {}
    for spec in own.model_seed_counts:
        name, sep, counts = spec.partition("=")
        if not sep or not counts:
            raise SystemExit(f"--model-seed-counts wants MODEL=COUNTS (e.g. gemma-3-270m=2); got {spec!r}")
        per_model[name] = [int(c) for c in counts.split(",")]
    timer = Timer(out)
    tables = []
    for model_name in cfg.models:
        if model_name == models.GEMMA3_ALIAS and models.TL_MAJOR < 4:
            print(f"{model_name}: skipped, it needs TransformerLens 4 (this is {models.TL_VERSION})")
            continue
        _, table = compare_model(out, cfg, model_name, per_model.get(model_name, seed_counts),
                                 progress=not args.no_progress,
                                 rank_pairs=own.rank_pairs)
        tables.append(table)
        print(table.to_string(index=False))
    table = pd.concat(tables, ignore_index=True)
    write_frame(table, out, "compare_methods")
    text = markdown(table) + f"\n\nMeasured on {machine()}; `python experiments/compare_methods.py " \
                             f"{' '.join(argv if argv is not None else __import__('sys').argv[1:])}`."
    (out / "compare_methods.md").write_text(text + "\n")
    if own.write_readme:
        write_readme(text)
    timer.done(rows=len(table))


if __name__ == "__main__":
    main()
