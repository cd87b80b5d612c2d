"""The experiment scripts run end to end (same files, tiny random model via --tiny) and resume."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

import chg_lens

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ["--tiny", "--n-seeds", "2", "--updates", "2", "--reg-updates", "2", "--n-prompts", "12", "--no-progress"]


def run_script(name: str, argv: list[str]) -> None:
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"exp_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    finally:
        sys.path.remove(str(EXPERIMENTS))


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
