"""Figure 2: change in target log-probability when the heads of G+ are set to 0 (vs 1) one by one,
cumulatively, in descending order of facilitation, irrelevance and interference.

    python experiments/figure2_ablation.py --smoke
    python experiments/figure2_ablation.py        # paper: Llama-3.2-3B-Instruct, 3 tasks, top 50 heads
"""

from _common import Config, Timer, fit_or_load, load, parse, plot, read_frame, task_data, write_figure, write_frame

SMOKE = Config(tasks=["ioi"], n_seeds=2, updates=20, reg_updates=20, batch_size=8, n_prompts=48,
               extra={"n_steps": 20})
FULL = Config(models=["meta-llama/Llama-3.2-3B-Instruct"], tasks=["math_cot", "bigbench_syntax", "csqa"],
              n_seeds=10, updates=500, reg_updates=500, batch_size=64, n_prompts=2000, extra={"n_steps": 50})


def main(argv=None) -> None:
    from chg_lens import ablation

    args, cfg, out = parse("figure2", __doc__, SMOKE, FULL, argv)
    timer = Timer(out)
    model = cfg.models[0]
    for task in cfg.tasks:
        name = f"ablation_{task}"
        frame = read_frame(out, name)
        if frame is None:  # resume: a finished task is not recomputed
            result, _ = fit_or_load(out, cfg, model, task, progress=not args.no_progress)
            _, val = task_data(cfg, model, task)
            frame = ablation.figure2(load(model), val, result, n_steps=cfg.extra.get("n_steps", 50)).frame
            frame.insert(0, "task", task)
            write_frame(frame, out, name)
        fig = plot.ablation_curves(frame)
        fig.update_layout(title=f"{fig.layout.title.text} — {model} / {task}")
        write_figure(fig, out, f"figure2_{task}")
        last = frame[frame.step == frame.step.max()].groupby("score").delta_logprob.mean()
        print(f"{task}: delta log-prob after {int(frame.step.max())} heads: " +
              ", ".join(f"{k} {v:+.3f}" for k, v in last.items()))
    timer.done()


if __name__ == "__main__":
    main()
