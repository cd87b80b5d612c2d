"""Bad input, faults and kills, one class of issue #14 per section: every case ends in a clear
error (type and message asserted) or in a result exactly equal to the one never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import chg_lens
from chg_lens import ablation, checks, fitting, results, store, sweep, taxonomy
from chg_lens.chg import CHGResult, fit_chg
from chg_lens.cli import main
from chg_lens.cli.options import task_options as parse_task_options
from chg_lens.contrastive import fit_contrastive

from conftest import REPO, WORDS, Killed, die_on_call, tiny_llama_hf, word_tokenizer

KW = dict(n_seeds=2, updates=4, reg_updates=4, batch_size=4, progress=False)


def tiny_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (n, 6), generator=g), torch.arange(6).expand(n, 6) >= 4)


def assert_same_fit(a: CHGResult, b: CHGResult) -> None:
    for k in a.logits:
        assert torch.equal(a.logits[k], b.logits[k]), k
        assert torch.equal(a.snapshots[k], b.snapshots[k]), k
        assert a.traces[k].keys() == b.traces[k].keys()
        for name in a.traces[k]:
            assert torch.equal(a.traces[k][name], b.traces[k][name]), (k, name)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama_hf(len(WORDS)).save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def whole(tiny_model):
    return fit_chg(tiny_model, tiny_data(), **KW)


# ============================================================================ 1. atomic writes
def count_write_points(monkeypatch, kill_at: int | None):
    """Make every write point of a checkpoint (tensors file, meta.json, the generation rename and
    the clean-up of old generations) count calls, raising Killed at call ``kill_at``."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed
            return fn(*args, **kwargs)
        return inner

    monkeypatch.setattr(results, "save_file", wrap(results.save_file))
    monkeypatch.setattr(os, "fsync", wrap(os.fsync))
    monkeypatch.setattr(os, "rename", wrap(os.rename))
    monkeypatch.setattr(fitting.shutil, "rmtree", wrap(fitting.shutil.rmtree))
    return calls


def test_a_kill_at_every_write_point_resumes_to_the_exact_uninterrupted_fit(tiny_model, whole, tmp_path, monkeypatch):
    data = tiny_data()
    with monkeypatch.context() as m:
        calls = count_write_points(m, None)
        fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "count", checkpoint_every=2, **KW)
        n_points = calls["n"]
    assert n_points >= 12  # 4 checkpoint saves x (tensors, meta, rename) + clean-ups
    for k in range(1, n_points + 1):
        ck = tmp_path / f"ck{k}"
        with monkeypatch.context() as m:
            count_write_points(m, k)
            with pytest.raises(Killed):
                fit_chg(tiny_model, data, checkpoint_dir=ck, checkpoint_every=2, **KW)
        resumed = fit_chg(tiny_model, data, checkpoint_dir=ck, checkpoint_every=2, **KW)
        assert_same_fit(resumed, whole)
        assert resumed.traces["g_plus"]["nll"].shape[0] == KW["reg_updates"]


def test_a_real_kill_between_renames_resumes_exactly(model_folder, tmp_path):
    """os._exit (no clean-up, like SIGKILL) in a child process at the 3rd rename, then resume here."""
    ck = tmp_path / "ck"
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(REPO / 'tests')!r})
import chg_lens
from test_bad_input import KW, tiny_data
model = chg_lens.load_model({str(model_folder)!r})
real, n = os.rename, [0]
def dying(a, b):
    n[0] += 1
    if n[0] == 3:
        os._exit(9)
    return real(a, b)
os.rename = dying
chg_lens.fit_chg(model, tiny_data(), checkpoint_dir={str(ck)!r}, checkpoint_every=2, **KW)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert fitting.checkpoint_meta(ck) is not None
    model = chg_lens.load_model(str(model_folder))
    resumed = fit_chg(model, tiny_data(), checkpoint_dir=ck, checkpoint_every=2, **KW)
    assert_same_fit(resumed, fit_chg(model, tiny_data(), **KW))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_model, whole, tmp_path, monkeypatch):
    data = tiny_data()
    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 8)  # G+/G- update 3 of 4: generations after g0:done and g_pm@2 exist
        with pytest.raises(Killed):
            fit_chg(tiny_model, data, checkpoint_dir=ck, checkpoint_every=2, **KW)
    newest = sorted(ck.glob("gen-*"))[-1]
    raw = bytearray((newest / results.TENSORS).read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte
    (newest / results.TENSORS).write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="skipped 1 damaged generation"):
        resumed = fit_chg(tiny_model, data, checkpoint_dir=ck, checkpoint_every=2, **KW)
    assert_same_fit(resumed, whole)


def test_a_result_save_killed_before_its_rename_leaves_the_old_result_whole(whole, tmp_path, monkeypatch):
    out = tmp_path / "run"
    whole.save(out)
    other = CHGResult(**{**whole.__dict__, "logits": {k: v + 1 for k, v in whole.logits.items()}})

    def killed(a, b):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(store, "_exchange", killed)
        with pytest.raises(Killed):
            other.save(out)
    back = CHGResult.load(out)  # the old result, tensors and meta together
    assert_same_fit(back, whole)
    other.save(out)  # the next save clears what the killed one left behind
    assert torch.equal(CHGResult.load(out).logits["g0"], other.logits["g0"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_without_an_atomic_exchange_a_kill_between_the_two_renames_is_reported(whole, tmp_path, monkeypatch):
    out = tmp_path / "run"
    whole.save(out)
    with monkeypatch.context() as m:
        m.setattr(store, "_exchange", lambda a, b: False)
        die_on_call(m, os, "rename", 2)  # the old folder moved aside, the new one not yet in place
        with pytest.raises(Killed):
            whole.save(out)
    with pytest.raises(FileNotFoundError, match=r"a save was interrupted .* previous result is at .*\.run\.old-"):
        CHGResult.load(out)
    whole.save(out)  # a later save completes and clears the leftovers
    assert_same_fit(CHGResult.load(out), whole)
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_a_second_writer_of_the_same_folder_gets_a_clear_error(whole, tmp_path):
    out = tmp_path / "run"
    with results.folder_lock(out):
        with pytest.raises(ValueError, match="another process .* is writing the result"):
            whole.save(out)
    whole.save(out)
    ck = fitting.Checkpointer(tmp_path / "ck", {"a": 1})
    with ck.locked():
        with pytest.raises(ValueError, match="is writing the checkpoint"):
            with fitting.Checkpointer(tmp_path / "ck", {"a": 1}).locked():
                pass


# ============================================================================ 2. non-finite numbers
@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=float("nan")), "lam must be a finite number"), (dict(lam=float("inf")), "lam must be a finite number"),
    (dict(clip=float("nan")), "clip must be a finite number"), (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(reg_lr_end=-1.0), "reg_lr_end must be >= 0"), (dict(n_seeds=1.5), "n_seeds must be a whole number"),
    (dict(updates=True), "updates must be a whole number"), (dict(checkpoint_every=0), "checkpoint_every must be at least 1"),
])
def test_non_finite_or_out_of_range_options_fail_before_work(tiny_model, kwargs, match, monkeypatch):
    monkeypatch.setattr(fitting, "run_stages", lambda *a, **k: pytest.fail("fitting started"))
    with pytest.raises(ValueError, match=match):
        fit_chg(tiny_model, tiny_data(), **{**KW, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=float("nan")), "lam must be a finite number"), (dict(lam=-0.1), "lam must be >= 0"),
    (dict(max_diff=float("inf")), "max_diff must be a finite"), (dict(clip=0.0), "clip must be > 0"),
])
def test_contrastive_lam_rules_match_chg(tiny_model, kwargs, match):
    d = tiny_data()
    with pytest.raises(ValueError, match=match):
        fit_contrastive(tiny_model, d, d, updates=2, batch_size=4, progress=False, **kwargs)


def test_nan_inf_or_misshaped_gates_and_bases_are_refused(tiny_model):
    d = tiny_data(4)
    L, H = 2, 4
    bad = torch.ones(L, H)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"gates holds 1 non-finite value"):
        chg_lens.scoring.evaluate(tiny_model, d, bad)
    with pytest.raises(ValueError, match=r"base holds 1 non-finite"):
        ablation.head_sweep(tiny_model, d, base=bad)
    with pytest.raises(ValueError, match=r"base must lie in \[0, 1\]"):
        ablation.sequential_ablation(tiny_model, d, base=torch.full((L, H), 2.0))
    with pytest.raises(ValueError, match=r"base must be shaped \[2, 4\].*got \[4, 2\]"):
        ablation.head_sweep(tiny_model, d, base=torch.ones(H, L))
    with pytest.raises(ValueError, match="configs holds"):
        ablation.score_configs(tiny_model, d, torch.full((3, L, H), float("inf")))


def test_roles_are_never_assigned_from_nan():
    g = torch.rand(1, 2, 3)
    g[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="1 head.* non-finite .* no role"):
        taxonomy.scores_frame(g, torch.rand(1, 2, 3))


def test_a_fit_whose_loss_turns_nan_stops_naming_stage_and_update():
    calls = {"n": 0}

    def loss(gates, rows):
        calls["n"] += 1
        value = gates.flatten(1).mean(1) * (float("nan") if calls["n"] == 3 else 1.0)
        return value, {}

    stage = fitting.Stage("g0", 5, 0.1, 0.01)
    with pytest.raises(FloatingPointError, match="stage g0, update 3 of 5: the loss is not finite"):
        fitting.run_stage(stage, torch.zeros(2, 2, 2), loss, None, 8, 4, 0, progress=False)


# ============================================================================ 3. bad data
@pytest.fixture(scope="module")
def word_tok():
    return word_tokenizer(WORDS)


@pytest.mark.parametrize("name, text, where", [
    ("rows.csv", "input,output\nw1 w2,w3\nw4 w5\nw6,w7\n", r"rows.csv, line 3, column 'output': missing"),
    ("rows.csv", "input,output\nw1 w2,w3\nw4,\nw6,w7\n", r"rows.csv, line 3, column 'output': empty"),
    ("rows.json", json.dumps([{"input": "w1", "output": "w2"}, {"input": None, "output": "w3"}]),
     r"rows.json, record 2, column 'input': missing"),
    ("rows.jsonl", '{"input": "w1", "output": "w2"}\n\n{"input": "w3", "output": "  "}\n',
     r"rows.jsonl, line 3, column 'output': empty"),
    ("rows.jsonl", '{"input": "w1", "output": "w2"}\n\n{"input": "w3", "output": \n', r"rows.jsonl, line 3: not valid JSON"),
])
def test_missing_or_empty_fields_name_file_line_and_column(word_tok, tmp_path, name, text, where):
    from chg_lens.tasks.custom import from_file

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=where):
        from_file(word_tok, str(path))


def test_empty_rows_are_dropped_with_a_count_only_when_asked(word_tok, tmp_path):
    from chg_lens.tasks.custom import from_file

    path = tmp_path / "rows.parquet"
    pd.DataFrame({"input": ["w1 w2", None, "w3", "w4", "w5"], "output": ["w6", "w7", "", "w8", "w9"]}).to_parquet(path)
    with pytest.raises(ValueError, match="row 2, column 'input': missing"):
        from_file(word_tok, str(path))
    with pytest.warns(UserWarning, match="dropped 2 of 5 row"):
        train, val = from_file(word_tok, str(path), drop_empty=True)
    assert len(train) + len(val) == 3


def test_float_negative_and_out_of_vocabulary_token_ids_are_refused(tiny_model):
    mask = [[False, True]]
    with pytest.raises(ValueError, match=r"row 0, position 1: token id 5.5 is not an integer"):
        chg_lens.TaskDataset.from_tokens([[1, 5.5]], mask)
    with pytest.raises(ValueError, match="must hold integer token ids; got dtype torch.float32"):
        chg_lens.TaskDataset.from_tokens(torch.tensor([[1.0, 5.0]]), torch.tensor(mask))
    with pytest.raises(ValueError, match="negative token id -1"):
        chg_lens.TaskDataset.from_tokens([[1, -1]], mask)
    with pytest.raises(ValueError, match="token id 99 .* outside the model's vocabulary of 32"):
        chg_lens.TaskDataset.from_tokens([[1, 99]], mask).check_model(tiny_model)


# ============================================================================ 4/6. early errors, one line
def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.err


@pytest.mark.parametrize("extra, match", [
    (["--checkpoint-every", "0"], "checkpoint_every must be at least 1"),
    (["--lam", "nan"], "lam must be a finite number"),
    (["--n-seeds", "0"], "n_seeds must be at least 1"),
    (["--dtype", "float64"], "dtype must be one of float32"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--task-option", "seed=abc"], "task 'ioi': option seed must be a whole number; got 'abc'"),
    (["--task", "custom", "--task-option", "n_shots=1.5"], "option n_shots must be a whole number; got 1.5"),
    (["--task-option", "val_fraction=abc"], "option val_fraction must be a number; got 'abc'"),
    (["--task-option", "nope=1"], "task 'ioi' does not take nope"),
])
def test_cli_fit_bad_options_fail_before_the_model_loads(tmp_path, capsys, no_model_load, extra, match):
    code, err = run_cli(["fit", "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and match in err and err.count("\n") == 1


def test_cli_bad_out_paths_fail_before_the_model_loads(tmp_path, capsys, no_model_load):
    file = tmp_path / "file.txt"
    file.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [(file, "is a file, not a folder"), (file / "sub", "lies inside"), (Path("."), "current folder")]
    if os.geteuid() != 0:
        cases.append((ro / "out", "is not writable"))
    for out, match in cases:
        code, err = run_cli(["fit", "--out", str(out)], capsys)
        assert code == 2 and match in err, err
    with pytest.raises(ValueError, match="checkpoint_dir .* is a file"):
        fit_chg(None, tiny_data(), checkpoint_dir=file)


def test_cli_unloadable_model_and_debug_traceback(tmp_path, capsys, monkeypatch):
    code, err = run_cli(["fit", "--model", "/nonexistent/model", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "model '/nonexistent/model': no such file or folder" in err
    with pytest.raises(FileNotFoundError):
        main(["--debug", "fit", "--model", "/nonexistent/model", "--out", str(tmp_path / "o")])
    monkeypatch.setenv("CHG_LENS_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["fit", "--model", "/nonexistent/model", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="expects key=value"):  # a library helper: ValueError, not SystemExit
        parse_task_options(["oops"])


def test_damaged_results_load_with_one_clear_error(whole, tmp_path):
    def fresh(name):
        return whole.save(tmp_path / name)

    p = fresh("trunc")
    (p / "meta.json").write_text((p / "meta.json").read_text()[:40])
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON .* cut off"):
        CHGResult.load(p)
    p = fresh("latin1")
    (p / "meta.json").write_bytes(b'{"kind": "chg\xe9"}')
    with pytest.raises(ValueError, match="meta.json is not UTF-8"):
        CHGResult.load(p)
    p = fresh("flipped")
    raw = bytearray((p / results.TENSORS).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (p / results.TENSORS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the digest"):
        CHGResult.load(p)
    p = fresh("missing")
    t, meta = results.load_bundle(p)
    t.pop("logits/g_plus")
    tensors_only = {k: v for k, v in t.items()}
    results.save_bundle(tmp_path / "missing2", tensors_only, {k: v for k, v in meta.items()
                                                              if k not in ("digests", "files", "format", "identity")})
    with pytest.raises(ValueError, match="tensor.s. logits/g_plus are missing"):
        CHGResult.load(tmp_path / "missing2")


# ============================================================================ 5. overwriting
def test_refuses_to_overwrite_another_kind_or_fit_unless_asked(whole, tmp_path):
    folder = tmp_path / "abl"
    abl = ablation.AblationResult(pd.DataFrame({"layer": [0], "head": [1], "delta_logprob": [0.5]}), {"logprob": 0.0},
                                  {"n_layers": 2, "n_heads": 4, "model": "m", "mode": "individual"})
    abl.save(folder)
    with pytest.raises(ValueError, match=r"already holds a 'ablation' result \(model m, mode individual\).*--overwrite"):
        whole.save(folder)
    assert ablation.AblationResult.load(folder).frame.equals(abl.frame)  # untouched
    (folder / "notes.txt").write_text("mine")
    whole.save(folder, overwrite=True)
    assert CHGResult.load(folder).config == whole.config
    assert not (folder / "frame.csv").exists() and not (folder / "frame.parquet").exists()  # no stale CSVs
    assert (folder / "notes.txt").read_text() == "mine"  # the user's own file is kept
    other = CHGResult(**{**whole.__dict__, "config": {**whole.config, "lam": 0.5}})
    with pytest.raises(ValueError, match=r"different chg result .*config.lam \(0.1 there, 0.5 now\)"):
        other.save(folder)
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="other files .data.csv. and no chg_lens result"):
        whole.save(crowded)


def test_cli_fit_refuses_an_ablation_folder_and_removes_its_checkpoint(model_folder, tmp_path, capsys):
    abl_dir = tmp_path / "abl"
    ablation.AblationResult(pd.DataFrame({"layer": [0], "head": [1], "delta_logprob": [0.5]}), {"logprob": 0.0},
                            {"n_layers": 2, "n_heads": 4}).save(abl_dir)
    args = ["fit", "--model", str(model_folder), "--task", "custom", "--n-seeds", "1", "--updates", "2",
            "--reg-updates", "2", "--batch-size", "4", "--checkpoint-every", "1", "--no-progress"]
    data = tmp_path / "rows.csv"
    data.write_text("input,output\n" + "".join(f"w{i} w{i + 1},w{i + 2}\n" for i in range(10)))
    args += ["--data-dir", str(data)]
    code, err = run_cli(args + ["--out", str(abl_dir)], capsys)
    assert code == 2 and "already holds a 'ablation' result" in err
    out = tmp_path / "run"
    code, err = run_cli(args + ["--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "scores.csv").exists() and not (out / "checkpoint").exists()
    code, err = run_cli(args + ["--out", str(out), "--lam", "0.3"], capsys)
    assert code == 2 and "different chg result" in err and "config.lam" in err


# ============================================================================ 7. silent skips
def test_report_lists_what_it_skipped_and_exits_nonzero(whole, tmp_path, capsys):
    whole.save(tmp_path / "runs" / "good")
    bad = whole.save(tmp_path / "runs" / "bad")
    (bad / "meta.json").write_text('{"kind": "chg", "con')
    code, err = run_cli(["report", str(tmp_path / "runs")], capsys)
    assert code == 1 and "skipped" in err and "bad" in err and "not valid JSON" in err
    code, err = run_cli(["report", str(tmp_path / "runs"), "--allow-skipped"], capsys)
    assert code == 0 and "not valid JSON" in err
    assert "SKIPPED" in (tmp_path / "runs" / "report_summary.txt").read_text()


def test_unknown_or_unavailable_devices_are_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        checks.device("tpu")
    with pytest.raises(ValueError, match="not supported"):
        checks.device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            chg_lens.load_model("smollm2-135m-instruct", device="cuda")
    assert checks.device("cpu") == torch.device("cpu")


# ============================================================================ 8. sweeps
def test_sweep_checks_cells_with_the_fits_own_validation(model_folder, tmp_path):
    cfg = sweep.load_config({"out": str(tmp_path / "s"), "models": [str(model_folder),
                                                                    {"spec": str(model_folder), "name": "f64",
                                                                     "dtype": "float64"}],
                             "tasks": [{"name": "many", "task": "ioi", "options": {"n_prompts": "many"}}],
                             "seeds": [0], "lambdas": [0.1, float("nan")],
                             "fit": {"checkpoint_every": 0}, "grid": {"n_seeds": [1.5]}},
                            base_dir=tmp_path)
    with pytest.raises(ValueError) as err:
        sweep.check_config(cfg)
    msg = str(err.value)
    assert "option n_prompts must be a whole number; got 'many'" in msg
    assert "dtype must be one of" in msg and "n_seeds must be a whole number" in msg
    cfg2 = sweep.load_config({"out": str(tmp_path / "s2"), "models": [str(model_folder)], "tasks": ["ioi"],
                              "seeds": [0], "lambdas": [float("nan")], "fit": {"checkpoint_every": 0}})
    with pytest.raises(ValueError) as err:
        sweep.check_config(cfg2)
    assert "lam must be a finite number" in str(err.value)
    cfg3 = sweep.load_config({"out": str(tmp_path / "s3"), "models": [str(model_folder)], "tasks": ["ioi"],
                              "seeds": [0], "fit": {"checkpoint_every": 0}})
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1"):
        sweep.check_config(cfg3)
    assert not (tmp_path / "s").exists()


def test_sweep_rerun_waits_for_a_cell_still_running(model_folder, whole, tmp_path):
    import fcntl

    cfg = sweep.load_config({"out": str(tmp_path / "s"), "models": [str(model_folder)], "tasks": ["ioi"],
                             "seeds": [0], "executor": {"kind": "debug"}})
    cell = cfg.cells()[0]
    folder = sweep.cell_dir(cfg.out, cell)
    folder.mkdir(parents=True)
    lock = open(folder / sweep.LOCK, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a job of an earlier launch is fitting this cell

    def finish():
        time.sleep(1.5)
        whole.save(folder / "result")  # a finished cell: its result, then done.json
        (folder / sweep.DONE).write_text(json.dumps({"finished": "now", "seconds": 1.0, "fit_seconds": 1.0}))
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()

    threading.Thread(target=finish).start()
    t0 = time.time()
    index = sweep.run_sweep(cfg, poll_s=0.1, progress=False)
    assert time.time() - t0 >= 1.4 and list(index.status) == ["done"]


# ============================================================================ 9. untrusted folders, explain
def test_load_model_never_trusts_remote_code(model_folder, monkeypatch):
    import transformers

    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(Stop):
        chg_lens.load_model(str(model_folder))
    assert seen and seen[0]["trust_remote_code"] is False
    import importlib
    import inspect
    import pkgutil

    src = "".join(inspect.getsource(importlib.import_module(f"chg_lens.models.{m.name}"))
                  for m in pkgutil.iter_modules(chg_lens.models.__path__))
    assert ".from_pretrained(" in src
    assert src.count(".from_pretrained(") == src.count("trust_remote_code=False") + src.count('"trust_remote_code": False')


def test_explain_openai_checks_the_key_before_loading_and_takes_llm_options(tmp_path, capsys, monkeypatch,
                                                                            no_model_load):
    import argparse

    from chg_lens.cli.explain import add_arguments as add_cli_arguments

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, err = run_cli(["explain", "--explainer", "openai", "--wikitext-dir", str(tmp_path), "--outdir",
                         str(tmp_path / "x")], capsys)
    assert code == 2 and "needs OPENAI_API_KEY" in err and "nothing was loaded" in err
    p = argparse.ArgumentParser()
    add_cli_arguments(p)
    a = p.parse_args(["--llm-timeout", "5", "--llm-retries", "1"])
    assert (a.llm_timeout, a.llm_retries) == (5.0, 1)
    code, err = run_cli(["explain", "--llm-timeout", "nan", "--wikitext-dir", str(tmp_path)], capsys)
    assert code == 2 and "--llm-timeout must be a finite number" in err
