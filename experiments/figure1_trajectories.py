"""Figure 1b/c: gate trajectories of a facilitating, an interfering and an irrelevant head during
fitting, and G+ against G- per head after fitting.

    python experiments/figure1_trajectories.py --smoke          # SmolLM2 / IOI on a CPU
    python experiments/figure1_trajectories.py                  # paper: Llama-3.2-3B-Instruct / math
"""

from _common import Config, Timer, fit_or_load, parse, plot, write_figure, write_frame

SMOKE = Config(tasks=["ioi"], n_seeds=2, updates=20, reg_updates=20, batch_size=8, n_prompts=48)
FULL = Config(models=["meta-llama/Llama-3.2-3B-Instruct"], tasks=["math_cot"], n_seeds=10, updates=500,
              reg_updates=500, batch_size=64, n_prompts=2000)


def main(argv=None) -> None:
    args, cfg, out = parse("figure1", __doc__, SMOKE, FULL, argv)
    timer = Timer(out)
    model, task = cfg.models[0], cfg.tasks[0]
    result, _ = fit_or_load(out, cfg, model, task, progress=not args.no_progress)
    traj, scores = result.trajectories(), plot.gate_frame(result)
    write_frame(traj, out, "trajectories")
    write_frame(scores, out, "scores")
    write_figure(plot.trajectories(result), out, "figure1b_trajectories")
    write_figure(plot.gate_scatter(result), out, "figure1c_gplus_gminus")
    print(result.summary())
    timer.done(model=model, task=task)


if __name__ == "__main__":
    main()
