"""Figure 3: (a) empirical CDF of each CHG score across heads per model and task, with the
cross-model consistency statistic (Section 4.2: Pearson r between models' score distributions per
task and score); (b) layer x head maps, red = interference, green = facilitation, always / any.

    python experiments/figure3_distributions.py --smoke
    python experiments/figure3_distributions.py          # paper: 4 Llama-3 models x 3 tasks, 10 seeds
"""

import pandas as pd

from _common import Config, Timer, fit_or_load, parse, plot, write_figure, write_frame
from chg_lens import taxonomy

SMOKE = Config(tasks=["ioi", "induction"], n_seeds=2, updates=20, reg_updates=20, batch_size=8, n_prompts=48)
FULL = Config(models=["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
                      "meta-llama/Llama-3.1-8B-Instruct"],
              tasks=["math_cot", "bigbench_syntax", "csqa"], n_seeds=10, updates=500, reg_updates=500,
              batch_size=64, n_prompts=2000)


def main(argv=None) -> None:
    args, cfg, out = parse("figure3", __doc__, SMOKE, FULL, argv)
    timer = Timer(out)
    results = {(m, t): fit_or_load(out, cfg, m, t, progress=not args.no_progress)[0]
               for m in cfg.models for t in cfg.tasks}
    scores = pd.concat([r.scores() for r in results.values()], ignore_index=True)
    write_frame(scores, out, "scores")
    consistency = taxonomy.cross_model_consistency(scores)
    write_frame(consistency, out, "consistency")
    write_figure(plot.score_cdf(scores), out, "figure3a_cdf")
    for (m, t), r in results.items():
        write_figure(plot.role_map(r), out, f"figure3b_roles_{m.split('/')[-1]}_{t}")
    if len(consistency):
        print(f"cross-model Pearson r: min {consistency.pearson.min():.4f}, mean {consistency.pearson.mean():.4f}, "
              f"{len(consistency)} pairs")
    print(taxonomy.percent_above(scores, 0.5, by=("model", "task")).round(1).to_string(index=False))
    timer.done(n_fits=len(results))


if __name__ == "__main__":
    main()
