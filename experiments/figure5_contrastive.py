"""Figure 5: contrastive CHG separates in-context learning from instruction following.

Six function-vector tasks, each in two row-matched formats (10-shot ICL; instruction + one
example). For every held-out task and both directions (forget ICL / retain instruction, and the
reverse) one contrastive CHG mask is fitted on the other five tasks; the held-out task is scored in
both formats with and without the mask (accuracy with 95% Wilson intervals).

    python experiments/figure5_contrastive.py --smoke          # SmolLM2 on a CPU: 2 held-out tasks, minutes
    python experiments/figure5_contrastive.py                  # paper: Llama-3.2-3B-Instruct, all six, 500 updates
    python experiments/figure5_contrastive.py --smoke --heldout antonym capitalize --updates 40

Writes OUT/figure5_contrastive/: figure5.parquet/.csv (direction, heldout_task, format, gates,
accuracy, ci_low, ci_high, n), evaluation.parquet/.csv (accuracy and log-prob with CIs per fit and
seed), gates.parquet/.csv (the masks), figure5.html, and fits/<model>/fits/<direction>__<task>/ (one
ContrastiveResult each). A second run skips finished fits and resumes a cut one. The driver itself
(fits, caching, the Figure 5 rows) is ``_figure5.icl_vs_instruction``.
"""

import os
import sys
from pathlib import Path

import pandas as pd

from _common import HERE, Config, Timer, _slug, load, write_figure, write_frame
from _figure5 import DIRECTIONS, SIX_TASKS, icl_vs_instruction

from chg_lens.contrastive import ContrastiveResult

FV = Path(os.environ.get("CHG_LENS_SHARED_DATA", HERE.parent.parent / "shared" / "data")) / "function_vectors"
SMOKE = Config(tasks=list(SIX_TASKS), n_seeds=1, updates=20, batch_size=8, n_prompts=24,
               extra={"heldout": ["antonym", "country-capital"], "n_shots": 10, "n_eval": 32})
FULL = Config(models=["meta-llama/Llama-3.2-3B-Instruct"], tasks=list(SIX_TASKS), n_seeds=1, updates=500,
              batch_size=64, n_prompts=256, extra={"heldout": None, "n_shots": 10, "n_eval": None})


def main(argv=None) -> None:
    import argparse

    from _common import parse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--heldout", nargs="+", default=None)
    pre.add_argument("--n-shots", type=int, default=None)
    pre.add_argument("--data-dir", default=str(FV))
    own, rest = pre.parse_known_args(argv)
    args, cfg, out = parse("figure5_contrastive", __doc__, SMOKE, FULL, rest)
    heldout = own.heldout if own.heldout is not None else cfg.extra.get("heldout")
    n_shots = own.n_shots if own.n_shots is not None else cfg.extra.get("n_shots", 10)
    timer = Timer(out)
    frames, evals, gates = [], [], []
    for model_name in cfg.models:
        model = load(model_name)
        root = out / "fits" / _slug(model_name)
        frame = icl_vs_instruction(model, tasks=cfg.tasks, data_dir=own.data_dir, heldout=heldout,
                                   n_prompts=cfg.n_prompts, n_eval=cfg.extra.get("n_eval"), n_shots=n_shots,
                                   n_seeds=cfg.n_seeds, updates=cfg.updates, batch_size=cfg.batch_size, lam=cfg.lam,
                                   out_dir=root, progress=not args.no_progress)
        frames.append(frame.assign(model=model_name))
        for task in (heldout or cfg.tasks):
            for direction in DIRECTIONS:
                fit = ContrastiveResult.load(root / "fits" / f"{direction}__{task}")
                keys = dict(model=model_name, direction=direction, heldout_task=task)
                evals.append(fit.validation.assign(**keys))
                gates.append(fit.gates_frame().assign(**keys))
    figure5 = pd.concat(frames, ignore_index=True)
    write_frame(figure5, out, "figure5")
    write_frame(pd.concat(evals, ignore_index=True), out, "evaluation")
    write_frame(pd.concat(gates, ignore_index=True), out, "gates")
    from chg_lens import plot

    write_figure(plot.contrastive_bars(figure5[figure5["model"] == cfg.models[0]]), out, "figure5")
    print(figure5.to_string(index=False))
    timer.done(fits=len(figure5) // 4)


if __name__ == "__main__":
    sys.exit(main())
