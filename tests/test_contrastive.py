"""Contrastive CHG: a hand-set model where two prompt formats need different heads, pairing checks,
exact reloads, the confidence intervals and the CLI (the Figure 5 driver is tested in
test_experiments.py); one slow SmolLM2 run."""

import json

import pandas as pd
import pytest
import torch

import chg_lens
from chg_lens import CHGResult, models
from chg_lens.contrastive import (ContrastiveResult, check_matched, evaluate_contrastive, facilitation_overlap,
                                  fit_contrastive)
from chg_lens.stats import t_interval, t_quantile, wilson_interval

from conftest import SHARED_DATA, die_on_call, tiny_llama_hf, word_tokenizer

# ----------------------------------------------------------------------------- two-format model
A = [f"a{i}" for i in range(8)]
D = [f"d{i}" for i in range(8)]
WORDS = ["<unk>", "<bos>", "<eos>", "<pad>"] + A + D + ["n", "q"]
TID = {w: i for i, w in enumerate(WORDS)}
Y, X = 0, 1  # head Y serves both formats; head X only the forget format


def two_format_hf(distract=2.5, suppress=-2.0, q_scale=400.0, unembed=8.0):
    """One layer, 4 query heads over 2 KV heads, uniform attention (W_Q = W_K = 0).

    Retain format ``<bos> a_i n q -> a_i``; forget format ``<bos> a_i d_j q -> a_i`` (a distractor
    d_j that names another answer a_j). Head Y (0) copies a_i's answer and, more strongly, the
    distractor's answer a_j; head X (1) suppresses the distractor's answer. So the retain format
    needs only Y, the forget format needs Y and X (without X it answers a_j), heads 2 and 3 write
    nothing. Contrastive CHG (retain, forget) must switch off X only. The query token's large
    embedding keeps the final RMS norm nearly constant, so logits are close to linear in the gates.
    """
    V = len(WORDS)
    d_head = 16
    hf = tiny_llama_hf(V, n_layers=1, n_heads=4, n_kv_heads=2, d_head=d_head)
    out = lambda w: V + TID[w]
    s = 20.0
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.model.embed_tokens.weight[:, :V] = 40.0 * torch.eye(V)
        hf.model.embed_tokens.weight[TID["q"], TID["q"]] = q_scale
        attn = hf.model.layers[0].self_attn
        for k in range(8):
            attn.v_proj.weight[k, TID[A[k]]] = 1.0
            attn.v_proj.weight[8 + k, TID[D[k]]] = 1.0
            attn.o_proj.weight[out(A[k]), Y * d_head + k] = s                  # Y: the answer ...
            attn.o_proj.weight[out(A[k]), Y * d_head + 8 + k] = distract * s   # ... and the distractor's, stronger
            attn.o_proj.weight[out(A[k]), X * d_head + 8 + k] = suppress * s   # X: suppress the distractor's answer
        hf.lm_head.weight[:, V:2 * V] = unembed * torch.eye(V)
        for norm in (hf.model.layers[0].input_layernorm, hf.model.layers[0].post_attention_layernorm, hf.model.norm):
            norm.weight.fill_(1.0)
    return hf


def two_format_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    retain, forget = [], []
    for _ in range(n):
        i, j = torch.randperm(8, generator=g)[:2].tolist()
        retain.append([TID["<bos>"], TID[A[i]], TID["n"], TID["q"], TID[A[i]]])
        forget.append([TID["<bos>"], TID[A[i]], TID[D[j]], TID["q"], TID[A[i]]])
    mask = torch.zeros(n, 5, dtype=torch.bool)
    mask[:, -1] = True
    make = lambda rows, name: chg_lens.TaskDataset.from_tokens(torch.tensor(rows), mask.clone(),
                                                               pad_token_id=TID["<pad>"], name=name)
    return make(retain, "plain"), make(forget, "distractor")


@pytest.fixture(scope="module")
def two_format_model():
    return models.load_model(two_format_hf(), tokenizer=word_tokenizer(WORDS))


@pytest.fixture(scope="module")
def contrast_fit(two_format_model):
    retain, forget = two_format_data(48)
    ev = two_format_data(40, seed=1)
    # the paper's 500 updates at lr 0.1 -> 0.01 are for real models; 20 updates need a larger rate
    return fit_contrastive(two_format_model, retain, forget, n_seeds=2, updates=20, batch_size=16, lr=0.5,
                           lr_end=0.1, validation=ev, progress=False)


def test_model_has_the_designed_answer(two_format_model):
    retain, forget = two_format_data(40)
    cfg = torch.ones(3, 1, 4)
    cfg[1, 0, X] = 0
    cfg[2, 0, Y] = 0
    acc = lambda d: chg_lens.evaluate(two_format_model, d, cfg).correct.float().mean(1).tolist()
    assert acc(retain) == [1.0, 1.0, 0.0]   # retain needs Y only
    assert acc(forget) == [1.0, 0.0, 0.0]   # forget needs X and Y


def test_contrastive_switches_off_only_the_head_the_forget_format_needs(contrast_fit):
    g = contrast_fit.gates
    assert g.shape == (2, 1, 4)
    assert (g[:, 0, X] < 0.1).all(), g
    assert (g[:, 0, Y] > 0.9).all(), g
    assert (g[:, 0, 2:] > 0.5).all(), g      # irrelevant heads: lam > 0 pulls them toward 1
    assert contrast_fit.off_heads() == [(0, X)]
    frame = contrast_fit.gates_frame()
    assert list(frame.columns) == ["seed", "layer", "head", "gate", "off"]
    assert frame.loc[frame["off"], "head"].tolist() == [X, X]


def test_evaluation_keeps_retain_and_removes_forget(contrast_fit):
    ev = contrast_fit.validation
    assert list(ev.columns) == ["variant", "format", "gates", "seed", "accuracy", "accuracy_lo", "accuracy_hi",
                                "logprob", "logprob_lo", "logprob_hi", "n"]
    acc = ev.groupby(["variant", "gates"])["accuracy"].min()
    assert acc["retain", "default"] == 1.0 and acc["forget", "default"] == 1.0
    assert acc["retain", "gated"] == 1.0                                   # retained format kept
    assert ev.query("variant == 'forget' and gates == 'gated'")["accuracy"].max() == 0.0  # forgotten
    assert (ev["accuracy_lo"] <= ev["accuracy"]).all() and (ev["accuracy"] <= ev["accuracy_hi"]).all()
    assert (ev["logprob_lo"] <= ev["logprob"]).all() and (ev["logprob"] <= ev["logprob_hi"]).all()
    assert set(ev["format"]) == {"plain", "distractor"} and (ev["n"] == 40).all()


def test_traces_of_both_terms(contrast_fit):
    t = contrast_fit.traces
    assert {"retain_nll", "forget_nll", "forget_term", "reg", "loss"} <= set(t)
    assert all(v.shape == (20, 2) for v in t.values())
    assert t["forget_nll"][-1].mean() > t["forget_nll"][0].mean() + 0.5   # forgetting happened
    assert t["retain_nll"][-1].mean() < 0.2
    torch.testing.assert_close(t["loss"], t["retain_nll"] + t["forget_term"] - 0.1 * t["reg"])
    assert set(contrast_fit.trace_frame()["name"]) == set(t)
    assert contrast_fit.trajectories()["update"].max() == 20


def test_save_load_round_trip_is_exact(contrast_fit, tmp_path):
    path = contrast_fit.save(tmp_path / "run")
    back = ContrastiveResult.load(path)
    assert torch.equal(back.logits, contrast_fit.logits)
    assert torch.equal(back.snapshots, contrast_fit.snapshots)
    assert torch.equal(back.snapshot_steps, contrast_fit.snapshot_steps)
    assert back.traces.keys() == contrast_fit.traces.keys()
    assert all(torch.equal(back.traces[k], v) for k, v in contrast_fit.traces.items())
    assert back.config == contrast_fit.config and back.meta == contrast_fit.meta
    pd.testing.assert_frame_equal(back.validation, contrast_fit.validation)
    assert json.loads((path / "meta.json").read_text())["config"]["max_diff"] == 5.0
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in path.iterdir())
    with pytest.raises(ValueError, match="not a CHG result"):
        CHGResult.load(path)


def test_overlap_with_plain_chg_facilitating_heads(contrast_fit):
    def chg(g_minus):  # a CHG result whose facilitating heads are those with G- = 1
        logit = lambda g: torch.logit(torch.tensor(g).clamp(1e-4, 1 - 1e-4)).reshape(1, 1, 4).repeat(2, 1, 1)
        return CHGResult(logits={"g0": logit([0.5] * 4), "g_plus": logit([1.0] * 4), "g_minus": logit(g_minus)},
                         traces={}, snapshots={}, snapshot_steps={}, config={}, meta={"n_layers": 1, "n_heads": 4})
    frame = facilitation_overlap(contrast_fit, {"retain": chg([1, 0, 0, 0]), "forget": chg([1, 1, 0, 0])})
    r = frame.set_index("variant")
    assert r.loc["forget", "n_both"] == 1 and r.loc["forget", "jaccard"] == 0.5 and r.loc["forget", "both"] == "0.1"
    assert r.loc["retain", "n_both"] == 0 and r.loc["retain", "jaccard"] == 0.0
    assert (frame["n_off"] == 1).all() and r.loc["forget", "share_of_off"] == 1.0


def test_one_pass_and_two_passes_agree(two_format_model):
    from chg_lens.contrastive import _pair_scores

    retain, forget = two_format_data(8)
    gates = torch.rand(3, 1, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([5, 0, 3, 7])
    one = _pair_scores(two_format_model, retain, forget, rows, gates, one_pass=True)
    two = _pair_scores(two_format_model, retain, forget, rows, gates, one_pass=False)
    for a, b in zip(one, two):
        assert a.shape == (3, 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    single = chg_lens.row_logprobs(two_format_model, forget.tokens[rows], forget.loss_mask[rows], gates[1])
    torch.testing.assert_close(one[1][1], single.logprob_sum[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_gives_the_same_result(two_format_model, tmp_path, monkeypatch):
    retain, forget = two_format_data(16)
    kw = dict(n_seeds=2, updates=4, batch_size=4, progress=False)
    whole = fit_contrastive(two_format_model, retain, forget, **kw)
    import chg_lens.fitting as fitting

    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 3, KeyboardInterrupt)  # after the checkpoint at update 2
        with pytest.raises(KeyboardInterrupt):
            fit_contrastive(two_format_model, retain, forget, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    resumed = fit_contrastive(two_format_model, retain, forget, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    torch.testing.assert_close(resumed.logits, whole.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.traces["forget_nll"], whole.traces["forget_nll"], rtol=0, atol=1e-6)


def test_configs_per_pass_gives_the_same_fit(two_format_model):
    retain, forget = two_format_data(16)
    kw = dict(n_seeds=3, updates=4, batch_size=8, progress=False)
    whole = fit_contrastive(two_format_model, retain, forget, **kw)
    one_at_a_time = fit_contrastive(two_format_model, retain, forget, configs_per_pass=1, **kw)
    torch.testing.assert_close(one_at_a_time.logits, whole.logits, rtol=1e-4, atol=1e-5)
    for name in whole.traces:
        torch.testing.assert_close(one_at_a_time.traces[name], whole.traces[name], rtol=1e-4, atol=1e-5)


def test_mismatched_or_unpaired_rows_are_clear_errors(two_format_model):
    retain, forget = two_format_data(16)
    with pytest.raises(ValueError, match="retain has 16 rows but forget has 12"):
        fit_contrastive(two_format_model, retain, forget.subset(range(12)), progress=False)
    order = [i for i in range(15, -1, -1)]
    shuffled = forget.subset(order)
    assert [t for t in forget.tokens[:, -1].tolist()] != shuffled.tokens[:, -1].tolist()
    with pytest.raises(ValueError, match="not in the same order"):
        fit_contrastive(two_format_model, retain, shuffled, progress=False)
    a, b = two_format_data(4)
    a.row_meta["pair_id"] = [0, 1, 2, 3]
    b.row_meta["pair_id"] = [0, 1, 3, 2]
    with pytest.raises(ValueError, match="pair_id"):
        check_matched(a, b)
    b.row_meta["pair_id"] = [0, 1, 2, 3]
    check_matched(a, b)
    with pytest.raises(TypeError, match="TaskDataset"):
        fit_contrastive(two_format_model, (retain, retain), forget)
    with pytest.raises(ValueError, match="max_diff"):
        fit_contrastive(two_format_model, retain, forget, max_diff=0)


def test_concat_keeps_rows_meta_and_padding():
    from chg_lens.data import concat

    a, b = two_format_data(3)
    a.row_meta["pair_id"], b.row_meta["pair_id"] = [0, 1, 2], [3, 4, 5]
    a.meta["fmt"] = b.meta["fmt"] = "x"
    short = b.subset([0, 1]).subset([0, 1])
    short = chg_lens.TaskDataset(short.tokens[:, :4], short.loss_mask[:, :4] | (torch.arange(4) == 3),
                                 torch.tensor([4, 4]), short.pad_token_id, "short", None, {"fmt": "y"},
                                 {"pair_id": [3, 4]})
    both = concat([a, short])
    assert both.tokens.shape == (5, 5) and both.tokens[3:, 4].tolist() == [TID["<pad>"]] * 2
    assert not both.loss_mask[3:, 4].any() and both.row_meta["pair_id"] == [0, 1, 2, 3, 4]
    assert "fmt" not in both.meta and both.meta["part_sizes"] == [3, 2]
    assert concat([a, b]).meta["fmt"] == "x"


def test_confidence_intervals():
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-5)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.025, 30) == pytest.approx(-2.042272, abs=1e-5)
    lo, hi = wilson_interval(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-4) and hi == pytest.approx(0.9565, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 / 3 ** 0.5, abs=1e-5)


def test_evaluate_accepts_raw_gates(two_format_model):
    retain, forget = two_format_data(10)
    g = torch.ones(1, 4)
    g[0, X] = 0
    ev = evaluate_contrastive(two_format_model, g, retain, forget)
    assert ev.set_index(["variant", "gates"])["accuracy"].to_dict() == {
        ("retain", "default"): 1.0, ("retain", "gated"): 1.0, ("forget", "default"): 1.0, ("forget", "gated"): 0.0}


# ----------------------------------------------------------------------------- CLI
FV = SHARED_DATA / "function_vectors"


def test_cli_preset_fails_at_once_with_the_figure5_command(tmp_path, monkeypatch, capsys):
    from chg_lens.cli import main

    monkeypatch.setattr(chg_lens.models, "load_model", lambda *a, **k: pytest.fail("no model may load"))
    out = tmp_path / "fig 5"
    args = ["contrast", "--preset", "icl-vs-instruction", "--tasks", "country-capital,singular-plural",
            "--heldout", "country-capital", "--n-prompts", "6", "--n-shots", "2", "--updates", "2",
            "--batch-size", "4", "--data-dir", "/data/fv", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "chg-lens contrast: error: --preset icl-vs-instruction moved out of the library: the Figure 5 driver is now "
        "`python experiments/figure5_contrastive.py` in a source checkout; for these options run ")
    assert (f"run `python experiments/figure5_contrastive.py --smoke --tasks country-capital singular-plural "
            f"--heldout country-capital --n-shots 2 --n-prompts 6 --updates 2 --batch-size 4 --data-dir /data/fv "
            f"--out '{out}' --no-progress`") in err
    assert not out.exists()
    assert main(["contrast", "--preset", "icl-vs-instruction", "--model", "gpt2"]) == 2  # defaults are left out
    assert "run `python experiments/figure5_contrastive.py --smoke --models gpt2` (its --help" in capsys.readouterr().err
    assert not hasattr(chg_lens.contrastive, "icl_vs_instruction")  # the library has no driver to fall back on


def test_cli_contrast_on_files(tiny_gpt2_vocab_model, tmp_path, monkeypatch, capsys):
    from chg_lens.cli import main

    monkeypatch.setattr(chg_lens.models, "load_model", lambda *a, **k: tiny_gpt2_vocab_model)
    rows = [{"prompt": f"Q: word{i}\nA:", "target": f" W{i}"} for i in range(10)]
    write = lambda name, rs: (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rs))
    write("keep.jsonl", rows)
    write("other.jsonl", [{"prompt": f"Tell me word{i}:", "target": f" W{i}"} for i in range(10)])
    write("shuffled.jsonl", rows[::-1])
    out = tmp_path / "run"
    base = ["contrast", "--retain", str(tmp_path / "keep.jsonl"), "--updates", "2", "--batch-size", "4",
            "--no-progress", "--out", str(out)]
    assert main(base + ["--forget", str(tmp_path / "other.jsonl")]) == 0
    assert "heads off" in capsys.readouterr().out
    for name in ("tensors.safetensors", "meta.json", "gates.csv", "validation.csv", "summary.txt"):
        assert (out / name).exists()
    back = ContrastiveResult.load(out)
    assert back.meta["retain"] == "keep" and back.meta["forget"] == "other" and back.meta["n_train"] == 8
    assert len(pd.read_csv(out / "validation.csv")) == 4  # 2 variants x (default, 1 seed)
    assert main(base + ["--forget", str(tmp_path / "shuffled.jsonl")]) == 2  # checked before the split hides it
    assert "not in the same order" in capsys.readouterr().err
    assert main(["contrast", "--retain", str(tmp_path / "keep.jsonl")]) == 2
    assert "give --retain and --forget" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_forgets_icl_more_than_instruction(smollm2):
    """Retain the instruction format, forget the ICL format on two function-vector tasks
    (capitalize, present-past; 3-shot ICL to keep prompts CPU-sized), 12 updates of batch 4 at lr
    0.5 -> 0.1 (the paper's 500 updates at 0.1 do not fit a CPU test), one seed; then score the
    held-apart third of the rows (24 per format).

    Measured (TL 4.3, torch 2.13 CPU, seed 0): accuracy retain (instruction) 0.542 -> 0.083 gated,
    forget (ICL) 0.542 -> 0.000 gated; target log-prob retain -2.09 -> -7.26, forget -1.60 -> -12.56.
    At this budget the mask still cuts both formats (124 of 270 heads below 0.5: gates start at
    U(0, 1)), but the forgotten format loses more: accuracy drops 0.54 vs 0.46, log-prob 11.0 vs 5.2.
    """
    if not FV.exists():
        pytest.skip(f"no function-vector data at {FV}")
    from chg_lens.data import concat
    from chg_lens.tasks.function_vectors import fv_formats

    parts = [fv_formats(smollm2, t, n_prompts=36, n_shots=3, data_dir=FV) for t in ("capitalize", "present-past")]
    split = {f: [p[f].split(1 / 3, seed=0) for p in parts] for f in ("icl", "instruction")}
    train = {f: concat([s.train for s in split[f]]) for f in split}
    val = {f: concat([s.validation for s in split[f]]) for f in split}
    result = fit_contrastive(smollm2, train["instruction"], train["icl"], updates=12, batch_size=4, lr=0.5,
                             lr_end=0.1, validation=(val["instruction"], val["icl"]), progress=False)
    acc = result.validation.set_index(["variant", "gates"])["accuracy"]
    drop_retain = acc["retain", "default"] - acc["retain", "gated"]
    drop_forget = acc["forget", "default"] - acc["forget", "gated"]
    print(result.summary())
    lp = result.validation.set_index(["variant", "gates"])["logprob"]
    lp_drop_retain = lp["retain", "default"] - lp["retain", "gated"]
    lp_drop_forget = lp["forget", "default"] - lp["forget", "gated"]
    assert acc["forget", "default"] > 0.5 and acc["retain", "default"] > 0.5, result.validation
    assert acc["forget", "gated"] == 0.0, result.validation
    assert drop_forget > drop_retain, result.validation
    assert lp_drop_forget > lp_drop_retain + 3.0, result.validation


def test_contrastive_diagnostics(contrast_fit, two_format_model):
    d = contrast_fit.diagnostics()
    assert list(d.stage) == ["contrast", "contrast"] and list(d.seed) == [0, 1] and (d.window == 10).all()
    steps = contrast_fit.snapshot_steps.tolist()
    assert 10 in steps  # the window's start is a kept snapshot
    moved = (contrast_fit.gates - contrast_fit.snapshots[steps.index(10)]).abs().flatten(1)
    assert d.share_moving.tolist() == pytest.approx((moved > 0.05).double().mean(1).tolist())
    assert d.attrs["converged"] == bool(d.settled.all()) == contrast_fit.converged
    assert d.attrs["off_agreement"] == 1.0  # both seeds switch off the same head
    assert "converged:" in contrast_fit.summary() and "off_agreement 1.000" in contrast_fit.summary()
    retain, forget = two_format_data(16)
    with pytest.warns(chg_lens.diagnostics.NotConvergedWarning, match="contrastive CHG fit did not converge"):
        short = fit_contrastive(two_format_model, retain, forget, n_seeds=1, updates=2, batch_size=8, lr=0.5,
                                progress=False)
    assert not short.converged and "WARNING: contrastive CHG fit did not converge" in short.summary()


def test_validation_is_the_new_name_of_evaluate_on(two_format_model):
    retain, forget = two_format_data(8)
    ev = two_format_data(8, seed=1)
    kw = dict(updates=1, batch_size=8, progress=False)
    new = fit_contrastive(two_format_model, retain, forget, validation=ev, **kw)
    with pytest.warns(DeprecationWarning, match="validation"):
        old = fit_contrastive(two_format_model, retain, forget, evaluate_on=ev, **kw)
    pd.testing.assert_frame_equal(new.validation, old.validation)
    assert torch.equal(new.logits, old.logits)
    with pytest.raises(TypeError, match="got both evaluate_on= and validation="):
        fit_contrastive(two_format_model, retain, forget, validation=ev, evaluate_on=ev, **kw)


def test_positional_options_still_work_with_a_warning(two_format_model):
    retain, forget = two_format_data(8)
    new = fit_contrastive(two_format_model, retain, forget, n_seeds=2, updates=2, batch_size=8, seed=5, progress=False)
    with pytest.warns(DeprecationWarning, match="by position"):
        old = fit_contrastive(two_format_model, retain, forget, 2, 2, 8, 0.1, 5.0, 0.1, 0.01, 4.0, 5, progress=False)
    assert torch.equal(new.logits, old.logits)
