"""Table 2: percent of heads with facilitation / interference (and irrelevance) >= 0.5 in every
seed ("always") or in at least one seed ("any"), per model and task.

    python experiments/table2.py --smoke
    python experiments/table2.py                 # paper: 4 Llama-3 models x math, syntax, commonsense
"""

import pandas as pd

from _common import Config, Timer, fit_or_load, parse, write_frame

SMOKE = Config(tasks=["ioi"], n_seeds=2, updates=20, reg_updates=20, batch_size=8, n_prompts=48)
FULL = Config(models=["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
                      "meta-llama/Llama-3.1-8B-Instruct"],
              tasks=["math_cot", "bigbench_syntax", "csqa"], n_seeds=10, updates=500, reg_updates=500,
              batch_size=64, n_prompts=2000)


def main(argv=None) -> None:
    args, cfg, out = parse("table2", __doc__, SMOKE, FULL, argv)
    timer = Timer(out)
    frames = []
    for model in cfg.models:
        for task in cfg.tasks:
            result, _ = fit_or_load(out, cfg, model, task, progress=not args.no_progress)
            frames.append(result.scores())
    scores = pd.concat(frames, ignore_index=True)
    from chg_lens import taxonomy

    table = taxonomy.percent_above(scores, 0.5, by=("model", "task")).round(1)
    write_frame(table, out, "table2")
    (out / "table2.md").write_text(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))
    print(table.to_string(index=False))
    timer.done(rows=len(table))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
