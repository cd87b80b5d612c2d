"""Figure 4: per head, CHG facilitation (max over seeds) against the causal mediation (activation
patching) score, mediating heads marked, and the Welch t-test of facilitation between mediating and
other heads.

    python experiments/figure4_chg_vs_cma.py --smoke     # IOI with ABC corruption on SmolLM2
    python experiments/figure4_chg_vs_cma.py             # paper: function-vector tasks (Todd et al.)
"""

from _common import Config, Timer, fit_or_load, load, parse, plot, read_frame, write_figure, write_frame

SMOKE = Config(tasks=["ioi"], n_seeds=2, updates=20, reg_updates=20, batch_size=8, n_prompts=48,
               extra={"patch_prompts": 16, "n_std": 2.0})
FULL = Config(models=["meta-llama/Llama-3.1-8B"], tasks=["fv"], n_seeds=10, updates=500, reg_updates=500,
              batch_size=64, n_prompts=2000, task_options={"fv": {"task": "antonym"}},
              extra={"patch_prompts": 100, "n_std": 3.0})


def main(argv=None) -> None:
    from chg_lens import patching

    args, cfg, out = parse("figure4", __doc__, SMOKE, FULL, argv)
    timer = Timer(out)
    model = cfg.models[0]
    for task in cfg.tasks:
        result, _ = fit_or_load(out, cfg, model, task, progress=not args.no_progress)
        cma = read_frame(out, f"cma_{task}")
        if cma is None:  # resume: patching is not rerun when its frame exists
            n, n_std = cfg.extra["patch_prompts"], cfg.extra["n_std"]
            if task == "ioi":
                res = patching.ioi_patching(load(model), n_prompts=n, n_std=n_std)
            elif task == "fv":
                opts = cfg.task_options.get("fv", {})
                res = patching.function_vector_patching(load(model), opts.get("task", "antonym"), n_prompts=n,
                                                        data_dir=cfg.data_dir.get("fv"), n_std=n_std)
            else:
                raise SystemExit(f"figure 4 runs on ioi or fv; got {task}")
            cma = res.frame
            write_frame(cma, out, f"cma_{task}")
        try:
            cmp = patching.compare_chg_cma(result, cma)
            frame, note = cmp.frame, cmp.summary()
        except ValueError as err:  # too few mediating heads for a t-test at smoke scale
            fac = result.scores().groupby(["layer", "head"], as_index=False)["facilitation"].max()
            frame = fac.merge(cma[["layer", "head", "effect", "mediating"]], on=["layer", "head"])
            note = f"no t-test: {err}"
        write_frame(frame, out, f"chg_vs_cma_{task}")
        fig = plot.chg_vs_cma(frame)
        fig.add_annotation(text=note, xref="paper", yref="paper", x=0, y=-0.18, showarrow=False)
        write_figure(fig, out, f"figure4_{task}")
        print(f"{task}: {note}")
    timer.done()


if __name__ == "__main__":
    main()
