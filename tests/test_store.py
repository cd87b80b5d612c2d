"""chg_lens.store, the one place that writes files (issue 27, item 3): atomic file and folder writes,
locks and digests, used by results, checkpoints, sweeps, the CLI and explain; and the explain output
folder as a result kind ("explain") that chg_lens.load opens."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import chg_lens
from chg_lens import results, store

from conftest import REPO, WORDS

PACKAGE = REPO / "chg_lens"


# ----------------------------------------------------------------------------- one store
def test_no_module_but_the_store_writes_by_temporary_name_or_locks():
    """The five hand-written "temporary file + rename" writers (results, sweep twice, cli/sweep,
    explain with a fixed .tmp name two writers could race on) and the two lock implementations are
    gone: only store.py renames temporaries into place or calls flock."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "store.py":
            continue
        text = path.read_text()
        for pattern in (r"os\.replace\(", r"\bfcntl\b", r"renameat2", r"\.tmp[\"'-]", r"with_name\(.*\.tmp"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert offenders == []


def test_write_file_is_atomic_unique_per_writer_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "scores.csv"
    store.write_text(target, "old\n")
    seen = []
    real = os.replace

    def spy(a, b):
        seen.append(Path(a).name)
        return real(a, b)

    monkeypatch.setattr(os, "replace", spy)
    store.write_text(target, "new\n")
    store.write_table(pd.DataFrame({"a": [1, -2]}), target)
    assert len(set(seen)) == 2 and all(re.fullmatch(r"\.scores\.csv\.tmp-\d+-[0-9a-f]{8}", n) for n in seen)
    assert target.read_text() == "a\n1\n-2\n"

    def failing(p: Path):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_file(target, failing)
    assert target.read_text() == "a\n1\n-2\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no temporary left


def test_locks_refuse_a_second_holder_and_name_the_first(tmp_path):
    path = tmp_path / "cell" / "lock"
    assert not store.is_locked(path)
    with store.lock(path, "the cell"):
        assert store.is_locked(path)
        assert path.read_text() == f"pid {os.getpid()}"
        with store.try_lock(path) as held:
            assert held is False
        with pytest.raises(ValueError, match=rf"another process \(pid {os.getpid()}\) is writing the cell right now"):
            with store.lock(path, "the cell"):
                pass
    assert not store.is_locked(path)
    with store.folder_lock(tmp_path / "run", "result"):
        with pytest.raises(ValueError, match="is writing the result .*run right now"):
            with results.folder_lock(tmp_path / "run"):  # the old name is the same lock
                pass


def test_replace_folder_swaps_carries_over_and_follows_a_link(tmp_path):
    real = tmp_path / "real"
    store.publish_folder(real, lambda tmp: (tmp / "a.txt").write_text("1"))
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    store.replace_folder(link, lambda tmp: (tmp / "a.txt").write_text("2"), drop=lambda old: {"gone.txt"})
    assert link.is_symlink() and (real / "a.txt").read_text() == "2" and (real / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):
        store.publish_folder(real, lambda tmp: None)  # never over an existing folder
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_results_and_checkpoints_write_through_the_store(tiny_model, tmp_path, monkeypatch):
    """A result save is store.replace_folder, a checkpoint generation store.publish_folder."""
    calls = []
    for name in ("replace_folder", "publish_folder", "write_file"):
        real = getattr(store, name)
        monkeypatch.setattr(store, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (8, 6)), torch.arange(6).expand(8, 6) >= 4)
    fit = chg_lens.fit_chg(tiny_model, data, n_seeds=1, updates=2, reg_updates=2, batch_size=4, progress=False,
                           checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    assert "publish_folder" in calls
    fit.save(tmp_path / "run")
    assert calls[-1] == "replace_folder"


# ----------------------------------------------------------------------------- the explain result kind
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(WORDS[4 + int(i)] for i in torch.randint(0, 28, (800,), generator=g)))
    return path


def config(corpus, **kw):
    from chg_lens.explain import ExplainConfig

    return ExplainConfig(**{**dict(sources=str(corpus), n_windows=8, window_len=12, topk=5, max_heads=None,
                                   heads="0.0,0.1,1.0,1.1", min_cluster_size=2, batch_size=8, probe_sequences=2,
                                   probe_length=4), **kw})


@pytest.fixture(scope="module")
def explained(tiny_model, corpus, tmp_path_factory):
    from chg_lens.explain import run_explain

    out = tmp_path_factory.mktemp("explain") / "out"
    return run_explain(tiny_model, out, config(corpus), progress=False)


def test_an_explain_output_folder_is_a_result_chg_lens_load_opens(explained, tiny_model):
    from chg_lens import models
    from chg_lens.explain import ExplainResult

    back = chg_lens.load(explained.outdir)
    assert type(back) is ExplainResult and back.kind == "explain"
    pd.testing.assert_frame_equal(back.summary, explained.summary, check_dtype=False)
    assert back.clusters == explained.clusters and back.meta["n_layers"] == 2 and back.meta["n_heads"] == 4
    assert back.meta["weights"] == models.weights_fingerprint(tiny_model)
    assert back.meta["steps_run"] == ["cache", "explain", "simulate", "cluster", "report"]
    sim = back.tensor("simulation_score")
    assert sim.shape == (2, 4) and float(sim[1, 1]) == pytest.approx(float(
        explained.summary.set_index(["layer", "head"]).loc[(1, 1), "simulation_score"]), nan_ok=True)
    meta = results.read_meta(explained.outdir)
    assert meta["files"] == ["report.md", "summary.csv", "tensors.safetensors"]
    for name in ("report.md", "summary.csv"):  # written by the save, with digests
        assert meta["digests"][name] == store.sha256_file(explained.outdir / name)
    for name in ("raw_events.parquet", "explanations.jsonl", "scores.parquet", "clusters.json", "probes.parquet"):
        assert (explained.outdir / name).exists()  # the step files stay beside it
    assert results.read_meta(explained.outdir)["kind"] == "explain"


def test_a_rerun_replaces_the_explain_result_and_another_folder_is_refused_before_work(
        explained, tiny_model, corpus, tmp_path, monkeypatch):
    from chg_lens import explain
    from chg_lens.ablation import AblationResult

    again = explain.run_explain(None, explained.outdir, config(corpus, min_cluster_size=3), skip_cache=True,
                                skip_explain=True, skip_simulate=True, progress=False)
    assert again.steps_run == ["cluster", "report"]
    assert chg_lens.load(explained.outdir).config["min_cluster_size"] == 3
    abl = AblationResult(pd.DataFrame({"layer": [0], "head": [1], "delta_logprob": [0.5]}), {"logprob": 0.0},
                         {"n_layers": 2, "n_heads": 4}).save(tmp_path / "abl")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "data.csv").write_text("x")
    monkeypatch.setattr(explain.pipeline, "record_to_parquet", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=r"already holds a 'ablation' result"):
        explain.run_explain(tiny_model, abl, config(corpus), progress=False)
    with pytest.raises(ValueError, match=r"other files \(data.csv\) and no chg_lens result"):
        explain.run_explain(tiny_model, crowded, config(corpus), progress=False)
    assert AblationResult.load(abl).frame.delta_logprob.tolist() == [0.5]  # untouched


def test_two_explain_runs_never_write_one_folder_at_once(explained, corpus):
    from chg_lens import explain

    outdir = explained.outdir
    with store.lock(outdir.parent / f".{outdir.name}.explain.lock", "a first run"):
        with pytest.raises(ValueError, match="is writing the explain output"):
            explain.run_explain(None, outdir, config(corpus), skip_cache=True, skip_explain=True, skip_simulate=True,
                                skip_cluster=True, progress=False)
