"""Method comparison: compare_methods on tiny models (numbers checked against each method run on its own),
agreement, the saved folder (exact reload, damaged parts, replacing), the figure, the report section and
`chg-lens compare` end to end."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import chg_lens
from chg_lens import ablation, attribution, chg, compare, faithfulness, patching, plot
from chg_lens.cli import main
from chg_lens.compare import ComparisonResult, agreement_frame, compare_methods, split_pairs, top_heads, top_k_overlap
from chg_lens.diagnostics import NotConvergedWarning

from conftest import A_TOKENS, KNOWN_WORDS, gpt2_tokenizer, known_answer_data, tiny_llama_hf
from pair_models import random_pair as _pairs

FIT = dict(n_seeds=2, updates=3, reg_updates=3, batch_size=4)


def _known_pairs(n=24):
    """The known-answer rows ``<bos> a_i d_j q -> a_i`` and twins whose first token is another a_k."""
    clean = known_answer_data(n)
    tokens = clean.tokens.clone()
    ids = {w: i for i, w in enumerate(KNOWN_WORDS)}
    a_ids = torch.tensor([ids[t] for t in A_TOKENS])
    pos = (a_ids[None, :] == tokens[:, 1:2]).float().argmax(1)
    tokens[:, 1] = a_ids[(pos + 3) % len(a_ids)]
    corrupted = chg_lens.TaskDataset.from_tokens(tokens, clean.loss_mask.clone(), pad_token_id=ids["<pad>"],
                                                 name="known_answer_swapped")
    return clean, corrupted


@pytest.fixture(scope="module")
def tiny_comparison(tiny_model):
    data, corrupted = _pairs(0)
    held, _ = _pairs(1, rows=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        cmp = compare_methods(tiny_model, data, corrupted=corrupted, validation=held, fit_options=FIT,
                              progress=False, n_random=3, top_k=3)
    return cmp, data, corrupted, held


def test_each_method_is_the_library_call_and_the_curves_are_one_faithfulness_call(tiny_model, tiny_comparison):
    cmp, data, corrupted, held = tiny_comparison
    assert cmp.methods == list(compare.METHODS) and set(cmp.results) == {"chg", "attribution", "patching", "ablation"}
    assert cmp.meta["metric"] == "logit_diff" and cmp.meta["n_rows"] == 8 and cmp.meta["n_validation"] == 6
    patched = patching.patch_heads(tiny_model, data, corrupted, metric="logit_diff")
    torch.testing.assert_close(cmp.scores["patching"], patched.effects.abs(), check_dtype=False)
    attributed = attribution.attribute_heads(tiny_model, data, corrupted, metric="logit_diff")
    torch.testing.assert_close(cmp.scores["attribution"], attributed.effects.abs(), check_dtype=False)
    swept = ablation.head_sweep(tiny_model, data, method="mean", reference=data)
    torch.testing.assert_close(cmp.scores["ablation"], swept.tensor("delta_logit_diff").abs(), check_dtype=False)
    fit = cmp.results["chg"]
    assert fit.n_seeds == 2 and fit.config["updates"] == 3 and fit.validation is not None  # validation = held
    torch.testing.assert_close(cmp.scores["chg"], faithfulness.head_scores(fit, 2, 4))
    # the curves: the same rankings scored on the held-out rows, mean ablation over the method rows
    rankings = {"chg": fit, "attribution": attributed, "patching": patched,
                "ablation": swept.tensor("delta_logit_diff").abs(), "random": None}
    curves = faithfulness.faithfulness(tiny_model, held, rankings, ablation="mean", reference=data, metric="logit_diff",
                                       n_random=3, seed=0)
    pd.testing.assert_frame_equal(cmp.faithfulness.frame, curves.frame, check_exact=False, atol=1e-5, rtol=1e-4)
    assert cmp.seconds["random"] == 0.0 and all(cmp.seconds[m] > 0 for m in cmp.results)
    assert cmp.meta["faithfulness_seconds"] > 0


def test_table_and_agreement_numbers(tiny_comparison):
    cmp, *_ = tiny_comparison
    table = cmp.table()
    assert list(table.columns) == ["method", "seconds", "cpr", "cmd", "spearman_vs_patching", "top3_vs_patching"]
    np.testing.assert_allclose(table.set_index("method")["cpr"], cmp.faithfulness.cpr()[cmp.methods])
    np.testing.assert_allclose(table.set_index("method")["cmd"], cmp.faithfulness.cmd()[cmp.methods])
    row = table.set_index("method")
    assert row.loc["patching", "spearman_vs_patching"] == 1.0 and row.loc["patching", "top3_vs_patching"] == 1.0
    assert math.isnan(row.loc["random", "spearman_vs_patching"])
    a, b = cmp.scores["attribution"].flatten().numpy(), cmp.scores["patching"].flatten().numpy()
    assert row.loc["attribution", "spearman_vs_patching"] == pytest.approx(stats.spearmanr(a, b)[0])
    top = lambda x: set(np.argsort(-x, kind="stable")[:3].tolist())
    assert row.loc["attribution", "top3_vs_patching"] == pytest.approx(len(top(a) & top(b)) / 3)
    assert len(cmp.agreement) == 6  # every pair of the four scored methods
    matrix = cmp.agreement_matrix("top_k_overlap")
    assert (np.diag(matrix) == 1).all() and matrix.equals(matrix.T)
    assert "random" not in matrix.index and "spearman_vs_patching" in cmp.summary()


def test_top_heads_and_overlap_by_hand():
    s = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.9, float("nan")]])
    assert top_heads(s, 3) == [(0, 1), (1, 1), (1, 0)]  # ties by (layer, head), NaN last
    assert top_heads(s, 6)[-1] == (1, 2)
    t = torch.tensor([[0.1, 0.95, 0.8], [0.1, 0.2, 0.3]])
    assert top_k_overlap(s.nan_to_num(0), t, 2) == 0.5  # {(0,1), (1,1)} and {(0,1), (0,2)} share one of 2
    assert top_k_overlap(t, t, 10) == 1.0  # k capped at the 6 heads
    frame = agreement_frame({"a": t, "b": -t, "c": t * 2})
    assert list(zip(frame.method_a, frame.method_b)) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert frame.spearman.tolist() == pytest.approx([-1.0, 1.0, -1.0])


def test_known_model_ranks_the_answer_head_first(known_model):
    clean, corrupted = _known_pairs()
    cmp = compare_methods(known_model, clean, corrupted=corrupted, methods="attribution,patching,ablation,random",
                          n_heads=[0, 1, 2, 4], progress=False, top_k=1)
    assert cmp.meta["metric"] == "logprob"  # no answers: the target log-prob
    for method in ("attribution", "patching", "ablation"):
        assert top_heads(cmp.tensor(method), 1) == [(0, 0)], method  # head 0 copies the answer
    patched = cmp.tensor("patching")
    assert float(patched[0, 1]) == pytest.approx(0.0, abs=1e-4) and float(patched[0, 2:].abs().max()) < 1e-4
    curve = cmp.faithfulness.frame.set_index(["method", "k"])["normalized"]
    assert curve["patching", 1] > 0.5 and curve["patching", 4] == pytest.approx(1.0)
    assert (cmp.agreement.top_k_overlap == 1.0).all()


def test_reused_fits_keep_their_own_time_and_names(tiny_model, known_model, tiny_comparison):
    cmp, data, corrupted, held = tiny_comparison
    fit = cmp.results["chg"]
    other = chg_lens.CHGResult(**{**fit.__dict__, "meta": {**fit.meta, "seconds": {"g0": 2.0, "g_plus": 3.0,
                                                                                   "g_minus": 3.0}}})
    again = compare_methods(tiny_model, data, corrupted=corrupted, methods=["chg", "random"], n_heads=[0, 4, 8],
                            chg={"chg_a": fit, "chg_b": other}, progress=False)
    assert again.methods == ["chg_a", "chg_b", "random"] and again.meta["reused"] == ["chg_a", "chg_b"]
    assert again.seconds["chg_b"] == 5.0  # G0 + the joint G+/G- stage, counted once
    assert again.meta["in_sample"] and again.meta["n_validation"] == len(data)
    torch.testing.assert_close(again.tensor("chg_a"), again.tensor("chg_b"))
    assert again.agreement.spearman.tolist() == [pytest.approx(1.0)]
    assert "patching" not in again.table().columns.str.cat()
    with pytest.raises(ValueError, match="no CHG fit runs"):
        compare_methods(tiny_model, data, methods=["chg", "random"], chg=fit, fit_options=FIT)
    with pytest.raises(ValueError, match=r"is for \(2, 4\) heads; the model has \(1, 4\)"):
        compare_methods(known_model, known_answer_data(8), methods="chg", chg=fit)


def test_bad_input_fails_before_any_work(tiny_model, monkeypatch):
    for mod, name in ((chg, "fit_chg"), (attribution, "attribute_heads"), (patching, "patch_heads"),
                      (ablation, "head_sweep"), (faithfulness, "faithfulness")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("work started before the input was checked"))
    data, corrupted = _pairs(0)
    run = lambda **kw: compare_methods(tiny_model, data, **{"corrupted": corrupted, "progress": False, **kw})
    with pytest.raises(ValueError, match=r"unknown method\(s\) 'gates'; choose from chg, attribution"):
        run(methods="chg,gates")
    with pytest.raises(ValueError, match="patching need corrupted rows"):
        run(corrupted=None)
    with pytest.raises(ValueError, match="names a method twice"):
        run(methods=["random", "random"])
    with pytest.raises(ValueError, match="'chg' is not among the methods"):
        run(methods=["random"], chg=object())
    with pytest.raises(ValueError, match="fit_options may not set"):
        run(fit_options={"validation": data})
    with pytest.raises(ValueError, match="n_seeds"):
        run(fit_options={"n_seeds": 0})
    with pytest.raises(ValueError, match="n_heads must be"):
        run(n_heads=[0, 9])
    with pytest.raises(ValueError, match="ablation must be one of"):
        run(ablation="half")
    with pytest.raises(ValueError, match="rows"):
        run(corrupted=_pairs(0, rows=5)[1])
    with pytest.raises(ValueError, match="logit_diff"):
        run(metric="logit_diff", validation=chg_lens.TaskDataset.from_tokens(data.tokens, data.loss_mask))


# ----------------------------------------------------------------------------- the saved folder
def test_save_writes_one_folder_and_load_is_exact(tiny_comparison, tmp_path):
    cmp, *_ = tiny_comparison
    out = cmp.save(tmp_path / "cmp")
    for name in ("comparison.csv", "comparison.json", "agreement.csv", "faithfulness.html", "meta.json",
                 "chg/meta.json", "attribution/meta.json", "patching/meta.json", "ablation/meta.json",
                 "faithfulness/meta.json"):
        assert (out / name).exists(), name
    back = chg_lens.load(out)
    assert type(back) is ComparisonResult and back.methods == cmp.methods
    pd.testing.assert_frame_equal(back.table(), cmp.table())
    pd.testing.assert_frame_equal(back.agreement, cmp.agreement)
    pd.testing.assert_frame_equal(back.faithfulness.frame, cmp.faithfulness.frame)
    assert back.seconds == cmp.seconds and back.meta == json.loads(json.dumps(cmp.meta))
    for m, t in cmp.scores.items():
        assert torch.equal(back.scores[m], t)
    assert torch.equal(back.results["chg"].logits["g_plus"], cmp.results["chg"].logits["g_plus"])
    assert torch.equal(back.results["patching"].per_prompt, cmp.results["patching"].per_prompt)
    pd.testing.assert_frame_equal(back.results["ablation"].frame, cmp.results["ablation"].frame)
    pd.testing.assert_frame_equal(pd.read_csv(out / "comparison.csv"), cmp.table(), check_exact=False, rtol=1e-12)
    summary = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in summary["table"]] == cmp.methods
    page = (out / "faithfulness.html").read_text()
    assert "CPR" in page and "plotly.js v" in page


def test_damaged_parts_and_replacing_a_comparison(tiny_comparison, tmp_path):
    cmp, data, corrupted, held = tiny_comparison
    out = cmp.save(tmp_path / "cmp")
    cmp.save(out)  # the same comparison again: replaced in place
    assert chg_lens.load(out).methods == cmp.methods
    cmp.results["patching"].save(out / "ablation", overwrite=True)  # a part swapped for another result
    with pytest.raises(ValueError, match="ablation does not match the digest"):
        chg_lens.load(out)
    cmp.save(out)
    smaller = ComparisonResult(results={"patching": cmp.results["patching"]}, faithfulness=cmp.faithfulness,
                               scores={"patching": cmp.scores["patching"]}, seconds={"patching": 1.0},
                               agreement=agreement_frame({"patching": cmp.scores["patching"]}),
                               meta={**cmp.meta, "methods": ["patching"]})
    with pytest.raises(ValueError, match="already holds a different comparison"):
        smaller.save(out)
    smaller.save(out, overwrite=True)
    assert not (out / "chg").exists() and not (out / "ablation").exists()  # the old parts are gone
    assert chg_lens.load(out).methods == ["patching"]
    import shutil

    shutil.rmtree(out / "patching")
    with pytest.raises(ValueError, match="part 'patching'"):
        chg_lens.load(out)


# ----------------------------------------------------------------------------- figure and report
def test_faithfulness_curves_traces_from_a_frame():
    frame = pd.DataFrame({"method": ["a"] * 3 + ["random"] * 3, "k": [0, 2, 4] * 2, "fraction": [0, 0.5, 1] * 2,
                          "normalized": [0.0, 0.8, 1.0, 0.0, 0.3, 1.0]})
    fig = plot.faithfulness_curves(frame)
    assert [t.x.tolist() for t in fig.data] == [[0, 0.5, 1]] * 2
    assert list(fig.data[0].y) == [0.0, 0.8, 1.0]
    # trapezoids over fraction 0, 0.5, 1: CPR of a = 0.5 * (0 + 0.8) / 2 + 0.5 * (0.8 + 1) / 2 = 0.65,
    # CMD of a = 0.5 * (1 + 0.2) / 2 + 0.5 * (0.2 + 0) / 2 = 0.35; CMD of random = 0.5 * 1.7 / 2 + 0.5 * 0.7 / 2 = 0.6
    assert fig.data[0].name == "a (CPR 0.650, CMD 0.350)"
    assert fig.data[1].name == "random (CPR 0.400, CMD 0.600)" and fig.data[1].line.dash == "dash"
    assert fig.data[0].hovertext[1] == "a<br>k = 2 heads kept<br>fraction 0.500<br>faithfulness 0.800"
    assert fig.layout.title.text.endswith("ablate the rest") and fig.layout.xaxis.title.text == "fraction of heads kept"
    with pytest.raises(ValueError, match="needs columns"):
        plot.faithfulness_curves(frame.drop(columns="fraction"))


def test_faithfulness_curves_of_a_comparison(tiny_comparison):
    cmp, *_ = tiny_comparison
    fig = plot.faithfulness_curves(cmp)
    assert len(fig.data) == len(cmp.methods)
    cpr = cmp.faithfulness.cpr()
    assert fig.layout.title.text.endswith("(logit_diff)")
    for trace, method in zip(fig.data, cmp.methods):
        assert trace.name.startswith(f"{method} (CPR {cpr[method]:.3f}")


def test_report_shows_the_comparison(tiny_comparison, tmp_path):
    from chg_lens.report import write_report

    cmp, *_ = tiny_comparison
    out = cmp.save(tmp_path / "cmp")
    paths = write_report(out)
    page = paths["html"].read_text()
    assert "Method comparison" in page and "spearman_vs_patching" in page and "Agreement between methods" in page
    assert "Faithfulness: keep each method" in page and "Convergence diagnostics" in page  # and the CHG part
    assert "comparison on" in paths["summary"].read_text()
    # a comparison without CHG still has a report (no head rankings)
    few = tmp_path / "few"
    ComparisonResult(results={"patching": cmp.results["patching"]}, faithfulness=cmp.faithfulness,
                     scores={"patching": cmp.scores["patching"]}, seconds={"patching": 1.0},
                     agreement=agreement_frame({"patching": cmp.scores["patching"]}),
                     meta={**cmp.meta, "methods": ["patching"]}).save(few)
    paths = write_report(few)
    assert "rankings" not in paths and "Method comparison" in paths["html"].read_text()
    assert main(["report", str(few)]) == 0


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tok = gpt2_tokenizer()
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama_hf(len(tok), n_layers=2, n_heads=4, n_kv_heads=2, d_head=8).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_split_pairs_are_the_rows_of_tasks_ioi():
    tok = gpt2_tokenizer()
    clean, corrupted = chg_lens.tasks.ioi_pairs(tok, n_prompts=20, seed=3)
    train, held = split_pairs(clean, corrupted, 0.2, 3)
    want = chg_lens.tasks.ioi(tok, n_prompts=20, seed=3)
    assert train.clean.fingerprint() == want.train.fingerprint() and held.clean.fingerprint() == want.validation.fingerprint()
    assert train.corrupted.name == "ioi_abc" and len(held.corrupted) == 4
    patching.check_pair(train.clean, train.corrupted)


def test_cli_compare_end_to_end_and_reuse(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_folder), "--task", "ioi", "--n-prompts", "10", "--n-seeds", "1",
            "--updates", "2", "--reg-updates", "2", "--batch-size", "4", "--n-random", "2", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "spearman_vs_patching" in captured.out and "8 rows for the methods (with corrupted twins), 2 held out" \
        in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("WARNING: CHG fit did not converge")
    for name in ("comparison.csv", "agreement.csv", "faithfulness.html", "summary.txt", "chg", "patching",
                 "attribution", "ablation", "faithfulness"):
        assert (out / name).exists(), name
    cmp = chg_lens.load(out)
    assert cmp.methods == list(compare.METHODS) and cmp.meta["model"] == str(tiny_folder)
    assert cmp.meta["autocast"] is None and cmp.results["chg"].config["updates"] == 2
    same = chg_lens.tasks.ioi(chg_lens.load_model(str(tiny_folder)), n_prompts=10)  # CHG saw tasks.ioi's train rows
    assert cmp.results["chg"].meta["data_fingerprint"] == same.train.fingerprint() == cmp.meta["data_fingerprint"]
    assert cmp.meta["validation_fingerprint"] == same.validation.fingerprint()
    table = pd.read_csv(out / "comparison.csv")
    assert list(table.method) == list(compare.METHODS) and table.set_index("method").loc["patching",
                                                                                           "spearman_vs_patching"] == 1
    # reuse the fit: its own time, no new fit
    again = tmp_path / "again"
    assert main(["compare", "--chg", str(out / "chg"), "--methods", "chg,attribution,random", "--n-prompts", "10",
                 "--out", str(again), "--no-progress", "--ablation", "corrupted"]) == 0
    reused = chg_lens.load(again)
    assert reused.meta["reused"] == ["chg"] and reused.meta["ablation"] == "corrupted:ioi_abc"
    fit = cmp.results["chg"]
    assert reused.seconds["chg"] == pytest.approx(fit.meta["seconds"]["g0"] + fit.meta["seconds"]["g_plus"])
    assert "note: the reused fit" not in capsys.readouterr().out  # the same train rows


def test_cli_errors_come_before_the_model_loads(tmp_path, capsys):
    missing = str(tmp_path / "missing.gguf")
    cases = [(["--methods", "chg,gates"], "unknown method(s) 'gates'"),
             (["--task", "induction", "--methods", "attribution,patching"], "needs corrupted pairs, which only --task ioi"),
             (["--task", "induction", "--ablation", "corrupted", "--methods", "random"], "--ablation corrupted needs"),
             (["--n-heads", "0,x"], "--n-heads must be comma-separated"),
             (["--n-seeds", "0"], "n_seeds"),
             (["--chg", str(tmp_path)], "not a chg_lens result folder")]
    for extra, message in cases:
        assert main(["compare", "--model", missing, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "GGUF" not in err, (extra, err)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["compare", "--model", missing, "--out", str(tmp_path / "busy")]) == 2
    assert "no chg_lens result" in capsys.readouterr().err
