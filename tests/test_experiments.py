"""The experiment scripts run end to end (same files, tiny random model via --tiny) and resume;
the Figure 5 driver (experiments/_figure5.py) on a tiny model, and the command the CLI names for it."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest

import chg_lens
from chg_lens.contrastive import ContrastiveResult

from conftest import SHARED_DATA

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ["--tiny", "--n-seeds", "2", "--updates", "2", "--reg-updates", "2", "--n-prompts", "12", "--no-progress"]
FV = SHARED_DATA / "function_vectors"


def run_script(name: str, argv: list[str], patch=None) -> None:
    """``experiments/<name>.py``'s ``main(argv)``, with experiments/ on ``sys.path`` as when the script
    runs; ``patch(module)`` is called before ``main`` (e.g. to swap the model loader)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"exp_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if patch is not None:
            patch(module)
        module.main(argv)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def experiment_module(name: str):
    """An experiments/ module (e.g. ``_figure5``) imported as the scripts import it."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def test_figure5_driver_frame_and_resume(tiny_gpt2_vocab_model, tmp_path, monkeypatch):
    if not FV.exists():
        pytest.skip(f"no function-vector data at {FV}")
    fig5 = experiment_module("_figure5")
    model = tiny_gpt2_vocab_model
    kw = dict(tasks=("country-capital", "singular-plural"), data_dir=FV, heldout=["country-capital"], n_prompts=6,
              n_shots=2, updates=2, batch_size=4, out_dir=tmp_path / "fig5", progress=False)
    frame = fig5.icl_vs_instruction(model, **kw)
    assert list(frame.columns) == ["direction", "heldout_task", "format", "gates", "accuracy", "ci_low", "ci_high", "n"]
    assert len(frame) == 8 and set(frame["direction"]) == {"forget_icl", "forget_instruction"}
    assert set(frame["format"]) == {"icl", "instruction"} and (frame["n"] == 6).all()
    assert ((frame["ci_low"] <= frame["accuracy"]) & (frame["accuracy"] <= frame["ci_high"])).all()
    fit = ContrastiveResult.load(tmp_path / "fig5" / "fits" / "forget_icl__country-capital")
    assert fit.meta["retain_format"] == "instruction" and fit.meta["forget_format"] == "icl"
    assert fit.meta["n_train"] == 6 and fit.meta["direction"] == "forget_icl"
    acc = fit.validation.set_index(["variant", "gates"])["accuracy"]
    rows = frame[frame.direction == "forget_icl"].set_index(["format", "gates"])["accuracy"]
    assert rows["icl", "gated"] == acc["forget", "gated"] and rows["instruction", "default"] == acc["retain", "default"]

    # a second call with the same settings loads the finished fits; other settings are refused
    monkeypatch.setattr(fig5, "fit_contrastive", lambda *a, **k: pytest.fail("finished fits must not be refitted"))
    pd.testing.assert_frame_equal(fig5.icl_vs_instruction(model, **kw), frame)
    with pytest.raises(ValueError, match=r"other settings \(updates\)"):
        fig5.icl_vs_instruction(model, **{**kw, "updates": 3})
    with pytest.raises(ValueError, match="direction must be one of"):
        fig5.icl_vs_instruction(model, **{**kw, "directions": ["forget_both"]})


def test_the_command_the_cli_preset_names_runs_figure5(tiny_gpt2_vocab_model, tmp_path, capsys):
    if not FV.exists():
        pytest.skip(f"no function-vector data at {FV}")
    from chg_lens.cli import main

    out = tmp_path / "fig5"
    assert main(["contrast", "--preset", "icl-vs-instruction", "--tasks", "country-capital,singular-plural",
                 "--heldout", "country-capital", "--n-prompts", "6", "--n-shots", "2", "--updates", "2",
                 "--batch-size", "4", "--data-dir", str(FV), "--out", str(out), "--no-progress"]) == 2
    command = shlex.split(re.search(r"for these options run `([^`]*)`", capsys.readouterr().err).group(1))
    assert command[:3] == ["python", "experiments/figure5_contrastive.py", "--smoke"]

    def tiny(module):  # --smoke names SmolLM2; the tiny model stands in for it
        module.load = lambda name: tiny_gpt2_vocab_model

    run_script("figure5_contrastive", command[2:], patch=tiny)
    folder = out / "figure5_contrastive"
    frame = pd.read_csv(folder / "figure5.csv")
    assert len(frame) == 8 and set(frame["model"]) == {"smollm2-135m-instruct"}
    assert set(frame["heldout_task"]) == {"country-capital"} and (frame["n"] == 32).all()  # --smoke: 32 eval rows
    fig5 = experiment_module("_figure5")
    for direction in fig5.DIRECTIONS:
        fit = ContrastiveResult.load(folder / "fits" / "smollm2-135m-instruct" / "fits" / f"{direction}__country-capital")
        assert fit.config["updates"] == 2 and fit.config["batch_size"] == 4 and fit.meta["n_train"] == 6
        got = frame[frame.direction == direction].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, fig5.figure5_rows(fit, direction, "country-capital"), check_dtype=False)
    for name in ("figure5.parquet", "evaluation.csv", "gates.csv", "figure5.html", "timing.json"):
        assert (folder / name).exists(), name


@pytest.mark.slow
def test_experiment_scripts_smoke(tmp_path, capsys):
    if not (EXPERIMENTS.parent.parent / "shared" / "data" / "tokenizers" / "gpt2").exists():
        pytest.skip("the shared GPT-2 tokenizer is needed for --tiny")
    args = TINY + ["--out", str(tmp_path)]
    for name in ("figure1_trajectories", "table2", "figure2_ablation", "figure4_chg_vs_cma"):
        run_script(name, args)
    run_script("figure3_distributions", args + ["--tasks", "ioi"])
    fits = [p for p in (tmp_path / "fits").rglob("meta.json") if "checkpoint" not in p.parts]
    assert len(fits) == 1  # one (model, task, budget): every script reused the same fit
    for folder, files in {"figure1": ["trajectories.parquet", "figure1b_trajectories.html", "figure1c_gplus_gminus.html"],
                          "table2": ["table2.csv"], "figure2": ["ablation_ioi.parquet", "figure2_ioi.html"],
                          "figure3": ["scores.parquet", "consistency.csv", "figure3a_cdf.html"],
                          "figure4": ["cma_ioi.parquet", "chg_vs_cma_ioi.csv", "figure4_ioi.html"]}.items():
        for f in files:
            assert (tmp_path / folder / f).exists(), f"{folder}/{f}"
    abl = pd.read_parquet(tmp_path / "figure2" / "ablation_ioi.parquet")
    assert set(abl.score) == {"facilitation", "irrelevance", "interference"} and abl.step.max() == 8
    table = pd.read_csv(tmp_path / "table2" / "table2.csv")
    assert list(table.model) == ["tiny-random"]
    fit = chg_lens.load(next(p.parent for p in (tmp_path / "fits").rglob("meta.json") if "checkpoint" not in p.parts))
    want = chg_lens.taxonomy.percent_above(fit.scores(), 0.5)["any_facilitation"].iloc[0]  # the fit's own number
    assert table.any_facilitation.iloc[0] == pytest.approx(want, abs=0.05)
    # resume: a second run loads the fit and the ablation frame instead of recomputing them
    stamp = (tmp_path / "figure2" / "ablation_ioi.parquet").stat().st_mtime_ns
    capsys.readouterr()
    run_script("figure2_ablation", args)
    assert (tmp_path / "figure2" / "ablation_ioi.parquet").stat().st_mtime_ns == stamp
    assert [p for p in (tmp_path / "fits").rglob("meta.json") if "checkpoint" not in p.parts] == fits


@pytest.mark.slow
def test_experiment_scripts_at_smoke_scale_on_smollm2(tmp_path):
    # The --smoke configuration itself (SmolLM2 from the offline GGUF, the smoke tasks and prompts),
    # with a smaller budget so that the slow suite stays short: a fit, Figure 1 and Table 2 from it.
    from chg_lens import models

    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    args = ["--smoke", "--n-seeds", "1", "--updates", "4", "--reg-updates", "4", "--n-prompts", "16",
            "--no-progress", "--out", str(tmp_path)]
    run_script("figure1_trajectories", args)
    run_script("table2", args)
    traj = pd.read_parquet(tmp_path / "figure1" / "trajectories.parquet")
    assert set(traj.stage) == {"g0", "g_plus", "g_minus"} and traj["layer"].nunique() == 30 and traj["head"].nunique() == 9
    assert traj.gate.between(0, 1).all() and traj["update"].max() == 8
    table = pd.read_csv(tmp_path / "table2" / "table2.csv")
    assert list(table.model) == ["smollm2-135m-instruct"] and list(table.task) == ["ioi"]
    fits = [p for p in (tmp_path / "fits").rglob("meta.json") if "checkpoint" not in p.parts]
    assert len(fits) == 1  # Table 2 reused Figure 1's fit
    assert (tmp_path / "figure1" / "figure1b_trajectories.html").stat().st_size > 100_000  # plotly.js embedded


def test_compare_methods_script_on_a_tiny_model(tmp_path, capsys):
    if not (SHARED_DATA / "tokenizers" / "gpt2").exists():
        pytest.skip("the shared GPT-2 tokenizer is needed for --tiny")
    args = ["--tiny", "--seed-counts", "1,2", "--updates", "2", "--reg-updates", "2", "--n-prompts", "12",
            "--no-progress", "--out", str(tmp_path)]
    run_script("compare_methods", args)
    folder = tmp_path / "compare_methods"
    table = pd.read_csv(folder / "compare_methods.csv")
    assert list(table.method) == ["chg_1_seeds", "chg_2_seeds", "attribution", "patching", "ablation", "random"]
    assert set(table.model) == {"tiny-random"} and (table.seconds >= 0).all()
    cmp = chg_lens.load(folder / "tiny-random")
    pd.testing.assert_frame_equal(table.drop(columns=["model", "note"]), cmp.table(), check_exact=False, rtol=1e-9)
    assert cmp.meta["reused"] == ["chg_1_seeds", "chg_2_seeds"] and cmp.meta["n_rows"] == 10
    assert cmp.results["chg_2_seeds"].n_seeds == 2 and cmp.meta["n_validation"] == 2
    note = table.set_index("method").note
    assert note["chg_2_seeds"].startswith("2 seeds, 2 + 2 updates, ") and note["random"] == "mean of 5 orders"
    md = (folder / "compare_methods.md").read_text()
    assert md.startswith("| model | method | seconds | cpr | cmd | spearman_vs_patching | top10_vs_patching | note |")
    assert "| tiny-random | patching |" in md and "Measured on" in md
    fits = sorted(p.parent for p in (tmp_path / "fits").rglob("meta.json") if "checkpoint" not in p.parts)
    assert len(fits) == 2
    # a second run loads the fits and the comparison
    stamp = (folder / "tiny-random" / "meta.json").stat().st_mtime_ns
    run_script("compare_methods", args)
    assert (folder / "tiny-random" / "meta.json").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_csv(folder / "compare_methods.csv"), table)


def test_compare_methods_script_writes_the_readme_table(tmp_path):
    module = experiment_module("compare_methods")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{module.START}\nold\n{module.END}\nrest\n")
    table = pd.DataFrame({"model": ["m"], "method": ["random"], "seconds": [0.0], "cpr": [0.51234], "cmd": [0.25],
                          "spearman_vs_patching": [float("nan")], "top10_vs_patching": [float("nan")],
                          "note": ["mean of 5 orders"]})
    module.write_readme(module.markdown(table), readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| m | random | 0.0 | 0.512 | 0.250 |  |  | mean of 5 orders |" in text
