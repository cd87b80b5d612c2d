"""The command line on a tiny local model folder (offline), and its errors."""

import json

import pandas as pd

from chg_lens import CHGResult
from chg_lens.cli import main

from conftest import gpt2_tokenizer, tiny_llama_hf


def test_tasks_lists_ioi(capsys):
    assert main(["tasks"]) == 0
    assert "ioi" in capsys.readouterr().out


def test_fit_writes_a_results_folder_and_resumes(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tok = gpt2_tokenizer()
    tiny_llama_hf(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_head=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    args = ["fit", "--model", str(folder), "--task", "ioi", "--n-prompts", "20", "--n-seeds", "2",
            "--updates", "4", "--reg-updates", "4", "--batch-size", "4", "--out", str(out), "--no-progress"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "validation none" in printed and "heads with score >= 0.5" in printed
    # a 4-update fit does not converge: the summary says so and the CLI ends with one warning line
    assert "converged: NO" in printed and "converged: NO" in (out / "summary.txt").read_text()
    assert captured.err.strip().splitlines()[-1].startswith("WARNING: CHG fit did not converge")
    assert "more updates" in captured.err and not [w for w in caught if "did not converge" in str(w.message)]
    for name in ("tensors.safetensors", "meta.json", "scores.csv", "summary.txt"):
        assert (out / name).exists()
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 2 * 2 * 4 and set(scores["role"]) <= {"facilitating", "interfering", "irrelevant"}
    result = CHGResult.load(out)
    assert result.meta["task"] == "ioi" and result.config["updates"] == 4
    assert json.loads((out / "meta.json").read_text())["meta"]["n_train"] == 16


def test_bad_task_and_options_are_clear_errors(tmp_path, capsys):
    assert main(["fit", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "no GGUF file" in capsys.readouterr().err
