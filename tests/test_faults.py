"""The held-out faults of issue 28 (item 3), one regression test each (item 5): every case now ends in
a clear one-line error before any long work, or in the right result, and nothing already on disk is
lost. Tiny models built in the test; each test names the fault it guards in its docstring."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import chg_lens
from chg_lens import ablation, results, store
from chg_lens.chg import CHGResult, fit_chg

from conftest import WORDS, Killed, die_on_call, tiny_llama_hf, word_tokenizer

KW = dict(n_seeds=2, updates=4, reg_updates=4, batch_size=4, progress=False)


def tiny_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (n, 6), generator=g), torch.arange(6).expand(n, 6) >= 4)


@pytest.fixture(scope="module")
def fit(tiny_model):
    return fit_chg(tiny_model, tiny_data(), **KW)


@pytest.fixture(scope="module")
def sweep_result(tiny_model):
    return ablation.head_sweep(tiny_model, tiny_data(6))


def rewrite(folder: Path, edit=lambda meta: None, tensors: dict | None = None, digests: bool = True) -> None:
    """Edit a saved result's meta.json (and optionally replace its tensors) and recompute every
    digest, as a deliberate edit would leave it, or (``digests=False``) drop them all, as in a
    folder of an older release: what the load checks must catch beyond the digests."""
    meta = json.loads((folder / results.META).read_text())
    edit(meta)
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / results.TENSORS))
        meta["digests"][results.TENSORS] = store.sha256_file(folder / results.TENSORS)
    meta[results.META_DIGEST] = results.meta_digest(meta)
    if not digests:
        for k in ("digests", "files", "format", results.META_DIGEST):
            meta.pop(k)
    (folder / results.META).write_text(json.dumps(meta))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ============================================================================ loading results
def test_a_hand_edited_meta_json_is_detected(fit, sweep_result, tmp_path):
    """Fault: an edited value in an ablation result's meta.json (a delta 9.5 instead of -0.0067) went
    undetected: the digests did not cover meta.json. Now meta.json carries the sha256 of its own
    content, and a load of an edited copy is one ValueError; the untouched copy loads exactly."""
    path = sweep_result.save(tmp_path / "abl")
    pd.testing.assert_frame_equal(ablation.AblationResult.load(path).frame, sweep_result.frame)
    meta = json.loads((path / results.META).read_text())
    col = meta["frame"]["columns"].index("delta_logprob")
    meta["frame"]["data"][0][col] = 9.5
    (path / results.META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta.json was changed after it was written") as err:
        ablation.AblationResult.load(path)
    one_line(err)
    chg = fit.save(tmp_path / "chg")
    text = (chg / results.META).read_text()
    (chg / results.META).write_text(text.replace('"lam": 0.1', '"lam": 0.2'))
    with pytest.raises(ValueError, match="meta.json was changed after it was written"):
        chg_lens.load(chg)


def test_loaded_configs_are_checked(fit, tmp_path):
    """Fault: a CHG meta.json with n_seeds=-3, updates=-5 loaded and summary() printed "-5 + 3
    updates". Loaded configs now pass CHGConfig.check (and ContrastiveConfig.check)."""
    path = fit.save(tmp_path / "chg")

    def bad(meta):
        meta["config"].update(n_seeds=-3, updates=-5)

    rewrite(path, bad)
    with pytest.raises(ValueError, match=r"config: n_seeds must be at least 1; got -3") as err:
        CHGResult.load(path)
    one_line(err)


def test_contrastive_configs_are_checked_on_load(tiny_model, tmp_path):
    d = tiny_data(8)
    result = chg_lens.fit_contrastive(tiny_model, d, d, updates=2, batch_size=4, progress=False)
    path = result.save(tmp_path / "contrast")
    rewrite(path, lambda meta: meta["config"].update(max_diff=-1.0))
    with pytest.raises(ValueError, match="config: max_diff must be > 0"):
        chg_lens.load(path)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_gate_logits_are_refused_on_load(fit, tmp_path, value):
    """Fault: logits/g_minus set to +inf (digest recomputed) loaded and gave every head
    "facilitating"; only NaN was refused (later, in scores()). Every non-finite logit is now refused
    when the result loads."""
    path = fit.save(tmp_path / "chg")
    tensors, _ = results.load_bundle(path)
    tensors["logits/g_minus"] = torch.full_like(tensors["logits/g_minus"], value)
    rewrite(path, tensors=tensors)
    with pytest.raises(ValueError, match="tensor logits/g_minus holds non-finite values"):
        CHGResult.load(path)


@pytest.mark.parametrize("case, match", [
    ("kind_dict", r"kind \{'a': 1\} is not a chg_lens result kind"),
    ("layers_huge", "claims 1000000 layers x 4 heads, more than any model has"),
    ("layers_negative", "n_layers must be at least 1; got -1"),
    ("layers_fewer", r"the table's 'layer' column runs from 0 to 1, outside 0..0"),
    ("tensor_shape", r"tensor delta_logprob is shaped \[1, 4\], not \[2, 4\]"),
])
def test_ablation_kinds_and_shapes_are_checked_on_load(sweep_result, tmp_path, case, match):
    """Faults: meta.json "kind": {"a": 1} -> TypeError unhashable type; an ablation meta with n_layers
    10^6 (a 4 TB allocation in tensor()), -1, or fewer than the table's layers -> RuntimeError or
    IndexError; tensors of the wrong shape -> broadcasting errors later. Each is now one ValueError
    when the result loads (by chg_lens.load and by the class)."""
    path = sweep_result.save(tmp_path / case)
    tensors, _ = results.load_bundle(path)
    edits = {"kind_dict": lambda m: m.update(kind={"a": 1}),
             "layers_huge": lambda m: m["meta"].update(n_layers=10**6),
             "layers_negative": lambda m: m["meta"].update(n_layers=-1),
             "layers_fewer": lambda m: m["meta"].update(n_layers=1)}
    if case == "tensor_shape":
        rewrite(path, tensors={"delta_logprob": tensors["delta_logprob"][:1]})
    else:
        rewrite(path, edits[case])
    for load in (chg_lens.load, ablation.AblationResult.load):
        with pytest.raises(ValueError, match=match) as err:
            load(path).tensor()
        one_line(err)


@pytest.mark.parametrize("digests", [True, False])
def test_chg_tensors_of_the_wrong_shape_are_refused_on_load(fit, tmp_path, digests):
    """Fault: CHG tensors of the wrong shape (digest recomputed, or an older folder without digests)
    gave a broadcasting RuntimeError in scores(). The shapes are checked against the config's
    n_seeds and the meta's n_layers / n_heads when the result loads."""
    path = fit.save(tmp_path / "chg")
    tensors, _ = results.load_bundle(path)
    tensors["logits/g_plus"] = tensors["logits/g_plus"][:, :1]
    rewrite(path, tensors=tensors, digests=digests)
    with pytest.raises(ValueError, match=r"tensor logits/g_plus is shaped \[2, 1, 4\], not \[2, 2, 4\]"):
        CHGResult.load(path)


def test_a_chg_folder_relabelled_as_ablation_is_a_clear_error(fit, tmp_path):
    """Fault: a CHG folder with "kind": "ablation" loaded by AblationResult.load -> KeyError: 'frame'."""
    path = fit.save(tmp_path / "chg")
    rewrite(path, lambda m: m.update(kind="ablation"))
    with pytest.raises(ValueError, match=r"lacks 'frame', 'baseline' \(an ablation result needs them\)"):
        ablation.AblationResult.load(path)


@pytest.mark.parametrize("name", [results.TENSORS, results.META])
def test_a_fifo_in_place_of_a_result_file_is_refused_not_read(fit, tmp_path, name):
    """Fault: tensors.safetensors replaced by a FIFO blocked chg_lens.load forever. Files are
    checked to be regular files before they are read."""
    path = fit.save(tmp_path / "chg")
    (path / name).unlink()
    os.mkfifo(path / name)
    outcome = {}

    def load():
        try:
            chg_lens.load(path)
        except Exception as err:  # noqa: BLE001 - the outcome is asserted below
            outcome["err"] = err

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the reader so the test process can end
        with open(path / name, "wb"):
            pass
        pytest.fail("chg_lens.load blocked on a FIFO")
    assert isinstance(outcome.get("err"), ValueError)
    assert "is a named pipe (FIFO), not a regular file" in str(outcome["err"])


# ============================================================================ a fit's identity covers the weights
def save_hf(folder: Path, seed: int) -> None:
    tiny_llama_hf(len(WORDS), seed=seed).save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)


def test_a_killed_fit_never_resumes_on_other_weights_in_the_same_model_folder(tmp_path, monkeypatch):
    """Fault: kill a fit, put other weights in the same model folder, rerun with the same --out: the old
    checkpoint resumed silently (its key held the folder path, not the weights). The checkpoint key
    and the result identity now hold models.weights_fingerprint; the rerun is one clear error naming
    the weights, the checkpoint is kept, and with the first weights back the fit resumes exactly."""
    from chg_lens import fitting, models

    folder, ck = tmp_path / "model", tmp_path / "ck"
    save_hf(folder, seed=0)
    first = chg_lens.load_model(str(folder))
    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 6)
        with pytest.raises(Killed):
            fit_chg(first, tiny_data(), checkpoint_dir=ck, checkpoint_every=2, **KW)
    kept = sorted(p.name for p in ck.iterdir())
    save_hf(folder, seed=1)  # other weights, same folder, same name
    other = chg_lens.load_model(str(folder))
    assert models.model_name(other) == models.model_name(first)
    assert models.weights_fingerprint(other) != models.weights_fingerprint(first)
    with pytest.raises(ValueError, match=r"differs in weights \('[0-9a-f]{16}' there, '[0-9a-f]{16}' now\).*"
                                         r"weights are not those the checkpoint was fitted on") as err:
        fit_chg(other, tiny_data(), checkpoint_dir=ck, checkpoint_every=2, **KW)
    one_line(err)
    assert sorted(p.name for p in ck.iterdir()) == kept  # nothing on disk was lost
    resumed = fit_chg(first, tiny_data(), checkpoint_dir=ck, checkpoint_every=2, **KW)
    whole = fit_chg(first, tiny_data(), **KW)
    for k in whole.logits:
        assert torch.equal(resumed.logits[k], whole.logits[k])
    assert resumed.meta["weights"] == models.weights_fingerprint(first)
    out = resumed.save(tmp_path / "out")
    again = fit_chg(other, tiny_data(), **KW)
    with pytest.raises(ValueError, match="different chg result .*differs in weights"):
        again.save(out)


def test_the_weights_fingerprint_is_cheap_stable_and_follows_in_place_edits(tiny_model):
    from chg_lens import models

    a = models.weights_fingerprint(tiny_model)
    assert a == models.weights_fingerprint(tiny_model) and len(a) == 16
    p = next(tiny_model.parameters())
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    try:
        assert models.weights_fingerprint(tiny_model) != a
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert models.weights_fingerprint(tiny_model) == a


def test_a_contrastive_checkpoint_key_covers_the_weights(tmp_path, monkeypatch):
    from chg_lens import fitting

    folder, ck = tmp_path / "model", tmp_path / "ck"
    save_hf(folder, seed=0)
    d = tiny_data(8)
    kw = dict(updates=4, batch_size=4, progress=False, checkpoint_dir=ck, checkpoint_every=2)
    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 3)
        with pytest.raises(Killed):
            chg_lens.fit_contrastive(chg_lens.load_model(str(folder)), d, d, **kw)
    save_hf(folder, seed=1)
    with pytest.raises(ValueError, match="differs in weights"):
        chg_lens.fit_contrastive(chg_lens.load_model(str(folder)), d, d, **kw)


def test_a_saved_result_as_checkpoint_dir_says_what_it_is(fit, tiny_model, tmp_path):
    """Fault: fit_chg(checkpoint_dir=<a saved result of the same fit>) said the checkpoint "was
    written by a fit with other settings or data" (false). It now says the folder holds a saved
    result, not a checkpoint, and leaves it as it was."""
    path = fit.save(tmp_path / "chg")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ValueError, match=r"checkpoint_dir .*chg holds a saved 'chg' result, not a checkpoint") as err:
        fit_chg(tiny_model, tiny_data(), checkpoint_dir=path, **KW)
    one_line(err)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


# ============================================================================ results.cached
def test_cached_refuses_a_folder_holding_another_kind_before_fitting(fit, sweep_result, tmp_path):
    """Fault: results.cached(<a folder holding an ablation result>, {...}, fn) returned the ablation
    result. With kind= (a name or a class) another kind is refused before fn runs; with a key, a
    result cached did not write (no stored key) is refused too; old calls on folders cached wrote
    keep working."""
    folder = sweep_result.save(tmp_path / "abl")
    never = lambda f: pytest.fail("fn ran")
    for kind in ("chg", CHGResult):
        with pytest.raises(ValueError, match=r"holds a 'ablation' result .*, not the 'chg' result this call makes"):
            results.cached(folder, None, never, kind=kind)
    with pytest.raises(ValueError, match="holds a 'ablation' result that results.cached did not write"):
        results.cached(folder, {"updates": 4}, never)
    assert type(results.cached(folder, None, never)) is ablation.AblationResult  # key None: used as it is
    with pytest.raises(ValueError, match="unknown result kind 'chgg'"):
        results.cached(tmp_path / "new", None, never, kind="chgg")
    with pytest.raises(TypeError, match="fn returned AblationResult, not a 'chg' result; nothing was saved"):
        results.cached(tmp_path / "wrong", None, lambda f: sweep_result, kind="chg")
    assert not (tmp_path / "wrong" / results.META).exists()
    calls = []
    first = results.cached(tmp_path / "fit", {"updates": 4}, lambda f: calls.append(f) or fit, kind="chg")
    again = results.cached(tmp_path / "fit", {"updates": 4}, never, kind=CHGResult)
    assert len(calls) == 1 and torch.equal(again.logits["g0"], first.logits["g0"])


# ============================================================================ data files
@pytest.fixture(scope="module")
def word_tok():
    return word_tokenizer(WORDS)


ROWS = [{"input": f"w{i} w{i + 1}", "output": f"w{i + 2}"} for i in range(20)]


def test_a_csv_with_a_utf8_byte_order_mark_reads_like_one_without(word_tok, tmp_path):
    """Fault: a custom CSV with a UTF-8 byte-order mark (an Excel export) was "missing column(s)
    ['input']; it has ['output', '\\ufeffinput']". The readers drop a leading BOM."""
    from chg_lens.tasks.custom import from_file

    text = "input,output\n" + "".join(f"{r['input']},{r['output']}\n" for r in ROWS[:10])
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "excel.csv").write_text(text, encoding="utf-8-sig")
    assert (tmp_path / "excel.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    for a, b in zip(from_file(word_tok, str(tmp_path / "plain.csv")), from_file(word_tok, str(tmp_path / "excel.csv"))):
        assert torch.equal(a.tokens, b.tokens) and a.prompts == b.prompts
    (tmp_path / "excel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:10]), encoding="utf-8-sig")
    assert len(from_file(word_tok, str(tmp_path / "excel.jsonl")).train) == 8


def test_a_json_list_of_numbers_names_the_file_and_record(word_tok, tmp_path):
    """Fault: a custom task file holding a JSON list of ints: "argument of type 'int' is not
    iterable" (no file, no cause)."""
    from chg_lens.tasks.custom import from_file

    (tmp_path / "ints.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"ints.json, record 1: expected a JSON object with named fields .*got int 1"):
        from_file(word_tok, str(tmp_path / "ints.json"))


@pytest.mark.parametrize("constant, match", [("NaN", "record 6, column 'output': missing value"),
                                             ("Infinity", r"record 6, column 'output': non-finite \(inf\) value")])
def test_bare_nan_or_infinity_in_function_vector_data_is_refused(word_tok, tmp_path, constant, match):
    """Fault: a function-vector data file with bare NaN / Infinity values built prompts "A: nan",
    "Q: inf" (rc 0) while the custom task refused the same file. Both read it through the same
    text_columns check now, and say which record."""
    from chg_lens.tasks.custom import from_file
    from chg_lens.tasks.function_vectors import function_vector

    folder = tmp_path / "fv"
    folder.mkdir()
    (folder / "antonym.json").write_text(json.dumps(ROWS).replace('"w7"', constant, 1))
    with pytest.raises(ValueError, match=match) as err:
        function_vector(word_tok, data_dir=folder, n_prompts=8, n_shots=1)
    assert "drop_empty" not in one_line(err)  # fv has no such option: the message does not offer it
    with pytest.raises(ValueError, match=match):
        from_file(word_tok, str(folder / "antonym.json"))


# ============================================================================ options checked before the model loads
def run_cli(args, capsys):
    from chg_lens.cli import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.err


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    save_hf(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def fv_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fv")
    (folder / "antonym.json").write_text(json.dumps(ROWS))
    return folder


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_contrast_val_fraction_is_checked_for_registered_tasks(tmp_path, capsys, no_model_load, fv_dir, value):
    """Fault: chg-lens contrast --retain fv --forget fv --val-fraction 0 | -0.5 | 1.5 | nan ran and
    reported converged: the value was ignored for registered tasks (checked only for files). It is
    checked before the model loads, and passed to the tasks."""
    code, err = run_cli(["contrast", "--retain", "fv", "--forget", "fv", "--data-dir", fv_dir, "--val-fraction", value,
                         "--out", tmp_path / "c"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert ("--val-fraction must be in (0, 1)" in err) or ("--val-fraction must be a finite number" in err), err


def test_contrast_val_fraction_reaches_the_registered_task(tmp_path, capsys, model_folder, fv_dir):
    args = ["contrast", "--model", model_folder, "--retain", "fv", "--forget", "fv", "--data-dir", fv_dir,
            "--task-option", "n_shots=1", "--retain-option", "fmt=instruction", "--n-prompts", 8, "--updates", 2,
            "--batch-size", 4, "--no-progress"]
    code, err = run_cli(args + ["--val-fraction", "0.5", "--out", tmp_path / "half"], capsys)
    assert code == 0, err
    ev = pd.read_csv(tmp_path / "half" / "validation.csv")
    assert set(ev["n"]) == {4}  # 8 rows, half held out
    code, err = run_cli(args + ["--out", tmp_path / "default"], capsys)
    assert code == 0 and set(pd.read_csv(tmp_path / "default" / "validation.csv")["n"]) == {2}  # fv's own 0.2


def test_a_sweep_with_one_prompt_fails_its_pre_submission_check(model_folder, tmp_path):
    """Fault: a sweep with n_prompts: 1 passed the pre-submission check and failed inside the job.
    tasks.check_options (the sweep's check and chg-lens fit's) refuses n_prompts < 2 and a
    val_fraction outside (0, 1)."""
    from chg_lens import sweep

    cfg = sweep.load_config({"out": str(tmp_path / "s"), "models": [str(model_folder)],
                             "tasks": [{"name": "one", "task": "ioi", "options": {"n_prompts": 1}},
                                       {"name": "all", "task": "ioi", "options": {"val_fraction": 1.0}}],
                             "seeds": [0], "executor": {"kind": "debug"}})
    with pytest.raises(ValueError) as err:
        sweep.check_config(cfg)
    assert "option n_prompts must be at least 2; got 1" in str(err.value)
    assert "option val_fraction must be in (0, 1)" in str(err.value)
    assert not (tmp_path / "s").exists()


def test_fit_contrastive_validation_errors_name_the_validation(tiny_model, monkeypatch):
    """Faults: fit_contrastive(validation=data.split(0.25)) blamed retain/forget; validation=<one
    TaskDataset> gave "check_matched() argument after * must be an iterable". Both are now a
    TypeError about validation, before any fitting; unmatched validation sets are named as such."""
    monkeypatch.setattr(chg_lens.fitting, "run_stages", lambda *a, **k: pytest.fail("fitting started"))
    d = tiny_data(8)
    fit = lambda validation: chg_lens.fit_contrastive(tiny_model, d, d, updates=2, batch_size=4, progress=False,
                                                      validation=validation)
    with pytest.raises(TypeError, match=r"validation must be \(retain_eval, forget_eval\).*got the \(train, "
                                        r"validation\) split of one data set") as err:
        fit(d.split(0.25))
    one_line(err)
    with pytest.raises(TypeError, match="validation must be a pair .retain_eval, forget_eval. of TaskDatasets; got "
                                        "TaskDataset"):
        fit(d)
    with pytest.raises(ValueError, match="validation retain .first. has 8 rows but validation forget .second. has 4"):
        fit((d, tiny_data(4)))


# ============================================================================ explain
EVIL = ('<script>alert(1)</script> <img src=x onerror=alert(2)> [click](javascript:alert(3)) '
        '<a href="JavaScript:alert(4)">x</a> | pipe')


def test_explain_report_renders_no_html_or_script_links_from_explanations(tmp_path):
    """Fault: an LLM explanation holding <script>, <img onerror=...> or a javascript: link was copied
    raw into explain's report.md (Markdown viewers, Jupyter included, render raw HTML) and
    summary.csv. report.md now shows every free text through explain.report.md_text (HTML escaped,
    link syntax escaped, javascript: broken); summary.csv keeps the text but a cell a spreadsheet
    would run as a formula starts with a quote."""
    import csv

    import markdown

    from chg_lens.explain import build_summary, write_explain_report

    records = [{"layer": 0, "head": 0, "explanation": EVIL, "status": "ok"},
               {"layer": 0, "head": 1, "explanation": '=HYPERLINK("http://x","y")', "status": "ok"},
               {"layer": 1, "head": 0, "explanation": "-1 means nothing", "status": "ok"}]
    scores = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "simulation_score": [0.5, -0.25, 0.1],
                           "detection_score": [0.6, 0.5, 0.5], "label": ["<b>x</b>", "+cmd", "none"]})
    clusters = {"clusters": [{"id": 0, "size": 2, "heads": ["0.0", "0.1"], "exemplar": EVIL}],
                "labels": {"0.0": 0, "0.1": 0}, "n_noise": 1}
    summary, _ = build_summary(records, scores, clusters)
    md, csv_path = write_explain_report(summary, tmp_path, clusters, title="<i>t</i>",
                                        settings={"model": "<svg onload=alert(5)>"})
    page = markdown.markdown(md.read_text(), extensions=["tables"]).lower()
    for bad in ("<script", "<img", "<a href", "<svg", "<i>", "<b>", "javascript:", "onerror=alert(2)>"):
        assert bad not in page, bad
    assert "alert(1)" in page and "&lt;script&gt;" in page  # the text is shown, as text
    assert page.count("<tr>") == 1 + 3  # the pipe did not split a table row
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[0]["explanation"] == EVIL  # the data are kept as written
    assert rows[1]["explanation"].startswith("'=HYPERLINK") and rows[2]["explanation"] == "'-1 means nothing"
    assert rows[1]["label"] == "'+cmd" and rows[1]["simulation_score"] == "-0.25"  # numbers untouched


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    words = [WORDS[4 + int(i)] for i in torch.randint(0, 28, (800,), generator=g)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(words))
    return path


def explain_config(corpus, **kw):
    from chg_lens.explain import ExplainConfig

    return ExplainConfig(**{**dict(sources=str(corpus), n_windows=8, window_len=12, topk=5, max_heads=None,
                                   heads="0.0,0.1,1.0,1.1", min_cluster_size=2, batch_size=8, probe_sequences=2,
                                   probe_length=4), **kw})


def test_explain_refuses_a_chg_result_of_another_model(tiny_model, fit, corpus, tmp_path, monkeypatch):
    """Fault: explain --chg-result with a fit of another model (a 3-layer fit on a 2-layer model, or
    another model of the same shape) joined roles by (layer, head) without a word. The fit's shape
    and weights (or, for fits that predate the fingerprint, its model name) must be the explained
    model's: checked before the recording, and again against a reused recording."""
    from chg_lens import explain, models

    three = models.load_model(tiny_llama_hf(len(WORDS), n_layers=3), tokenizer=word_tokenizer(WORDS))
    same_shape = models.load_model(tiny_llama_hf(len(WORDS), seed=1), tokenizer=word_tokenizer(WORDS))
    for other, match in ((three, r"is a fit of a model with 3 layers x 4 heads .*explained model .* has 2 x 4"),
                         (same_shape, r"was fitted on other weights \(fingerprint [0-9a-f]{16}")):
        other_fit = fit_chg(other, tiny_data(), **KW)
        other_fit.meta["model"] = models.model_name(tiny_model)  # the same name: only shape / weights tell
        path = other_fit.save(tmp_path / f"chg{models.n_layers(other)}")
        with monkeypatch.context() as m:
            m.setattr(explain.pipeline, "record_to_parquet", lambda *a, **k: pytest.fail("recording started"))
            with pytest.raises(ValueError, match=match) as err:
                explain.run_explain(tiny_model, tmp_path / "x", explain_config(corpus, chg_result=str(path)),
                                    progress=False)
            one_line(err)
    good = fit.save(tmp_path / "good")
    out = explain.run_explain(tiny_model, tmp_path / "out", explain_config(corpus, chg_result=str(good)),
                              progress=False)
    assert set(out.summary.role) <= {"facilitating", "interfering", "irrelevant"} and len(out.summary) == 4
    with pytest.raises(ValueError, match="fitted on other weights"):  # a reused recording is checked too
        explain.run_explain(None, tmp_path / "out", explain_config(corpus, chg_result=str(tmp_path / "chg2")),
                            skip_cache=True, skip_explain=True, skip_simulate=True, skip_cluster=True, progress=False)


def test_explain_takes_a_negative_seed_and_checks_sim_windows_before_loading(tiny_model, corpus, tmp_path, capsys,
                                                                            no_model_load):
    """Fault: chg-lens explain --sim-windows -1 and --seed -1 errored after the model loaded and
    recorded, the second naming no option (other subcommands accept seed -1). --sim-windows is
    checked before the model loads; a negative seed runs (numpy's generators get it modulo 2**64)."""
    from chg_lens import explain

    code, err = run_cli(["explain", "--sources", corpus, "--sim-windows", "-1", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "--sim-windows must be at least 1; got -1" in err and err.count("\n") == 1
    out = explain.run_explain(tiny_model, tmp_path / "neg", explain_config(corpus, seed=-1), progress=False)
    again = explain.run_explain(tiny_model, tmp_path / "neg2", explain_config(corpus, seed=-1), progress=False)
    pd.testing.assert_frame_equal(out.summary, again.summary)
    assert len(out.summary) == 4 and out.steps_run == ["cache", "explain", "simulate", "cluster", "report"]


# ============================================================================ --out a symbolic link
def custom_fit_args(model_folder, data: Path) -> list:
    data.write_text("input,output\n" + "".join(f"w{i} w{i + 1},w{i + 2}\n" for i in range(10)))
    return ["fit", "--model", model_folder, "--task", "custom", "--data-dir", data, "--n-seeds", 1, "--updates", 2,
            "--reg-updates", 2, "--batch-size", 4, "--checkpoint-every", 1, "--no-progress"]


def leftovers(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_out_as_a_symlink_writes_into_its_folder_and_keeps_the_link(model_folder, tmp_path, capsys):
    """Fault: --out a symlink to an empty folder or to a result: the fit ran, then "OSError: Cannot
    call rmtree on a symbolic link"; the exchange replaced the link itself and left .L.tmp-*. The
    result is now written into the folder the link points to, the link stays, nothing is left over."""
    args = custom_fit_args(model_folder, tmp_path / "rows.csv")
    real, link = tmp_path / "real", tmp_path / "links" / "L"
    real.mkdir()
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    code, err = run_cli(args + ["--out", link], capsys)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    first = CHGResult.load(real)
    assert (real / "scores.csv").exists() and not (real / "checkpoint").exists()
    assert leftovers(tmp_path, link.parent) == []
    code, err = run_cli(args + ["--out", link, "--lam", "0.3"], capsys)  # a link to a result: checked as one
    assert code == 2 and "different chg result" in err
    code, err = run_cli(args + ["--out", link, "--lam", "0.3", "--overwrite"], capsys)
    assert code == 0, err
    assert link.is_symlink() and CHGResult.load(link).config["lam"] == 0.3 != first.config["lam"]
    assert leftovers(tmp_path, link.parent) == []


def test_a_dangling_out_symlink_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    """Fault: a dangling --out symlink gave FileExistsError after the model loaded."""
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for args in (["fit"], ["contrast", "--retain", "ioi", "--forget", "ioi"], ["ablate"],
                 ["explain", "--sources", tmp_path]):
        code, err = run_cli([*args, "--out", dangling], capsys)
        assert code == 2 and "is a symbolic link to" in err and "which does not exist" in err, (args, err)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


# ============================================================================ sweeps
def test_a_sweep_cell_whose_result_was_truncated_is_refitted_not_reported_done(model_folder, tmp_path):
    """Fault: after a cell's result file was truncated, `sweep run` reported it done and never refitted
    it (collect kept failing). A finished cell's result is verified (digests, cached per file
    version): a damaged one is `damaged` in the index, skipped by collect, and refitted by the next
    run, the damaged copy kept beside it as result.damaged-1."""
    from chg_lens import sweep

    rows = tmp_path / "rows.csv"
    rows.write_text("input,output\n" + "".join(f"w{i} w{i + 1},w{i + 2}\n" for i in range(10)))
    cfg = sweep.load_config({"out": str(tmp_path / "s"), "models": [str(model_folder)],
                             "tasks": [{"name": "rows", "task": "custom", "options": {"data_dir": str(rows)}}],
                             "seeds": [0], "fit": {"n_seeds": 1, "updates": 2, "reg_updates": 2, "batch_size": 4},
                             "executor": {"kind": "debug"}})
    assert list(sweep.run_sweep(cfg, progress=False).status) == ["done"]
    folder = sweep.cell_dir(cfg.out, cfg.cells()[0])
    good = CHGResult.load(folder / "result")
    tensors = folder / "result" / results.TENSORS
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    index = sweep.status(cfg)
    assert list(index.status) == ["damaged"] and "does not match the digest" in index.error[0]
    assert len(sweep.collect(cfg)) == 0
    with pytest.raises(ValueError, match="1 of 1 cells are not done"):
        sweep.collect(cfg, require_complete=True)
    index = sweep.run_sweep(cfg, progress=False)
    assert list(index.status) == ["done"] and index.completions[0] == 2
    again = CHGResult.load(folder / "result")
    assert torch.equal(again.logits["g_plus"], good.logits["g_plus"])  # the same fit, refitted
    aside = folder / "result.damaged-1"
    assert len((aside / results.TENSORS).read_bytes()) == 100 and (aside / sweep.DONE).exists()  # kept
    assert [e["event"] for e in sweep.read_events(folder)].count("damaged") == 1
    assert len(sweep.collect(cfg)) == 2 * 4  # layers x heads of one mask
    (folder / sweep.DONE).write_text("{cut")  # an unreadable done.json is damaged too, never a traceback
    assert list(sweep.status(cfg).status) == ["damaged"]


# ============================================================================ untrusted model folders
def test_a_model_folder_with_remote_code_says_what_chg_lens_supports(tmp_path, capsys):
    """Fault: for a folder with remote code, the transformers message told the user to pass
    trust_remote_code=True, which chg_lens (rightly) never does. The error now says chg_lens never
    runs a folder's code and what it supports; the folder's code is not run."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mycustom", "architectures": ["MyForCausalLM"], "vocab_size": 32,
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}))
    for name in ("configuration_my.py", "modeling_my.py"):
        (folder / name).write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match=r"needs its own Python code .*chg_lens never runs code from a model folder "
                                         r".*\(trust_remote_code stays off\).*model_type such as llama") as err:
        chg_lens.load_model(str(folder))
    assert "trust_remote_code=True" not in one_line(err)
    code, err = run_cli(["fit", "--model", folder, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "chg_lens never runs code from a model folder" in err and "=True" not in err
    assert not (tmp_path / "RAN").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model '.*broken': transformers could not load this local model"):
        chg_lens.load_model(str(broken))
