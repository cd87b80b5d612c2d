"""Head explanations (chg_lens.explain) on a hand-built GPT-2 whose heads are known, an OpenAI-compatible
HTTP server on 127.0.0.1 started by the test, caching, and a slow SmolLM2 run."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chg_lens import models
from chg_lens.explain import (ExplainConfig, Explainer, OpenAIExplainer, PatternExplainer, load_raw,
                              run_explain, sample_windows, score_head, split_windows)
from chg_lens.explain import pipeline as pipeline_mod
from chg_lens.explain.explainers import parse_explanation, parse_simulation

from conftest import SHARED_DATA, word_tokenizer

NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay"]
WORDS = [f"w{i}" for i in range(14)]
VOCAB = ["<unk>", "<bos>", "<eos>", "<pad>"] + NAMES + WORDS
N_POS = 32
KNOWN = {(0, 0): "previous_token", (0, 1): "first_token", (1, 0): "induction", (1, 1): "induction"}


def known_heads_hf():
    """Two-layer GPT-2 (learned positions) with hand-set weights. The residual stream is one-hot blocks
    (token, position, previous token, output dims) plus a large constant dim, so LayerNorm scales every
    position almost alike; every read is ``feature - reference`` (a dim that is always 0), which cancels
    LayerNorm's mean subtraction exactly.

    - layer 0 head 0, previous token: query = position p, key = position p - 1; it writes the previous
      token's identity, and its output is largest when that token is a name (then a word);
    - layer 0 head 1, first token: a constant query meets position 0's key, except on names, whose query
      cancels it (attention spreads out); position 0 has no value, so it is active only on names;
    - layer 1 head 0, induction: query = current token, key = the previous token written by head 0.0; with
      no earlier occurrence it falls back to position 0; its output is large when it copies a name;
    - layer 1 head 1, induction resting on the first token: the same circuit with weaker query/key weights,
      so even where the current token occurred before about half of its attention stays on position 0, and
      over all tokens the first token takes most of its attention (the attention-sink resting state that
      made raw attention mass call induction heads "first-token heads").
    All other heads and the MLPs write nothing (an attention-only model).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    V, D, dh, B = len(VOCAB), 128, 32, 6.0
    cfg = GPT2Config(vocab_size=V, n_positions=N_POS, n_embd=D, n_layer=2, n_head=4, n_inner=4 * D,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(cfg).eval()
    tid = {w: i for i, w in enumerate(VOCAB)}
    names, words = [tid[n] for n in NAMES], [tid[w] for w in WORDS]
    POS, PREV = V, V + N_POS
    OUT, CONST, REF = PREV + V, D - 2, D - 1
    Q, K, Vv = 0, D, 2 * D

    def scale(values):  # LayerNorm's 1/std for a residual with these nonzero entries
        x = torch.zeros(D)
        x[: len(values)] = torch.tensor(values)
        return 1 / float(x.std(unbiased=False))

    s0, s1 = scale([1, 1, B]), scale([1, 1, B, 1, 1, 0.5])

    def feat(W, row, col, a):  # read residual dim `row` (minus the reference dim) into column `col`
        W[row, col] += a
        W[REF, col] -= a

    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        tr = hf.transformer
        tr.wte.weight[:, :V] = torch.eye(V)
        tr.wpe.weight[:, POS:POS + N_POS] = torch.eye(N_POS)
        tr.wpe.weight[:, CONST] = B
        for ln in [tr.ln_f] + [b.ln_1 for b in tr.h] + [b.ln_2 for b in tr.h]:
            ln.weight.fill_(1.0)
        W0, B0, O0 = tr.h[0].attn.c_attn.weight, tr.h[0].attn.c_attn.bias, tr.h[0].attn.c_proj.weight
        for p in range(1, N_POS):                        # 0.0 previous token
            feat(W0, POS + p, Q + p, 8.5 / s0)
            feat(W0, POS + p - 1, K + p, 8.5 / s0)
        for t in range(V):
            feat(W0, t, Vv + t, 1 / s0)
            O0[t, PREV + t] = 1.0
            O0[t, OUT] = 2.0 if t in names else (0.5 if t in words else 0.3)
        B0[Q + dh] = 10.0                                # 0.1 first token
        feat(W0, POS, K + dh, 8.0 / s0)
        for t in names:
            feat(W0, t, Q + dh, -10.0 / s0)
        for t in names + words:
            feat(W0, t, Vv + dh + t, 1 / s0)
            O0[dh + t, OUT + 1] = 1.0
        W1, B1, O1 = tr.h[1].attn.c_attn.weight, tr.h[1].attn.c_attn.bias, tr.h[1].attn.c_proj.weight
        for t in names + words:                           # 1.0 induction
            feat(W1, t, Q + t, 12.0 / s1)
            feat(W1, PREV + t, K + t, 12.0 / s1)
            feat(W1, t, Vv + t, 1 / s1)
            O1[t, OUT + 2] = 3.0 if t in names else 1.0
        B1[Q + 31] = 10.0
        feat(W1, POS, K + 31, 7.0 / s1)
        for t in names + words:                           # 1.1 induction that mostly rests on the first token
            feat(W1, t, Q + dh + t, 8.3 / s1)
            feat(W1, PREV + t, K + dh + t, 8.3 / s1)
            feat(W1, t, Vv + dh + t, 1 / s1)
            O1[dh + t, OUT + 3] = 3.0 if t in names else 1.0
        B1[Q + dh + 31] = 10.0
        feat(W1, POS, K + dh + 31, 7.0 / s1)
    return hf


@pytest.fixture(scope="module")
def known_heads():
    return models.load_model(known_heads_hf(), tokenizer=word_tokenizer(VOCAB))


def write_text(path: Path, n_docs=60, seed=0) -> Path:
    """Documents of names and words; half of them repeat a span (so induction has targets)."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        words = [rng.choice(NAMES) if rng.random() < 0.2 else rng.choice(WORDS) for _ in range(20)]
        if d % 2:
            words += words[3:15]
        docs.append(" ".join(words))
    path.write_text("\n\n".join(docs))
    return path


def small_config(text: Path, **kw) -> ExplainConfig:
    base = dict(sources=str(text), n_windows=40, window_len=N_POS, topk=20, max_heads=None,
                heads="0.0,0.1,1.0,1.1", min_cluster_size=2, batch_size=20)
    base.update(kw)
    return ExplainConfig(**base)


@pytest.fixture(scope="module")
def pattern_run(known_heads, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    text = write_text(tmp / "corpus.txt")
    out = run_explain(known_heads, tmp / "out", small_config(text), progress=False)
    return out, text


def test_windows_mix_sources_and_read_local_formats(tmp_path, known_heads):
    import zipfile

    (tmp_path / "se").mkdir()
    with zipfile.ZipFile(tmp_path / "se" / "unix.zip", "w") as zf:        # stackexchange-dataset --out_format zip
        for i in range(6):
            zf.writestr(f"q{i}.txt", " ".join(["Ann w1 w2 w3"] * 20))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": " ".join(["Bob w4 w5"] * 30)}) for _ in range(4)))
    w = sample_windows(known_heads, ["stackexchange", str(tmp_path / "docs.jsonl")], n_windows=6, window_len=16,
                       stackexchange_dir=str(tmp_path / "se"))
    assert w.tokens.shape == (6, 16) and (w.tokens[:, 0] == 1).all()       # BOS first
    assert sorted(w.source).count("stackexchange") == 3
    tok = known_heads.tokenizer
    assert tok.convert_ids_to_tokens(w.tokens[w.source.index("stackexchange")].tolist())[1:4] in (
        ["Ann", "w1", "w2"], ["w1", "w2", "w3"], ["w2", "w3", "Ann"], ["w3", "Ann", "w1"])
    with pytest.raises(ValueError, match="stackexchange-dir"):
        sample_windows(known_heads, "stackexchange", 4, 16)
    with pytest.raises(ValueError, match="only"):
        sample_windows(known_heads, str(tmp_path / "docs.jsonl"), 50, 16)


def test_recorded_activity_is_the_head_output_norm_and_hooks_are_read_only(known_heads):
    from chg_lens.explain.record import record_batch

    toks = torch.randint(4, len(VOCAB), (3, 20), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = 1
    with torch.no_grad():
        before = models.run_with_hooks(known_heads, toks)
        act, src, w, mass = record_batch(known_heads, toks, [(0, 0), (1, 0), (1, 3)], top_sources=3)
        z = {}
        models.run_with_hooks(known_heads, toks, [(models.z_hook_name(1), lambda x, hook: z.setdefault(1, x.clone()))])
        after = models.run_with_hooks(known_heads, toks)
    manual = (z[1][:, :, 0] @ models.W_O(known_heads)[1, 0]).norm(dim=-1)
    assert torch.allclose(act[..., 1], manual, atol=1e-5) and act[..., 2].abs().max() == 0   # 1.3 writes nothing
    assert (src[:, 1:, 0, 0] == torch.arange(19)).all() and (w[:, 1:, 0, 0] > 0.99).all()    # previous token
    assert torch.equal(before, after)


def brute_force_sources(tok: list[int], q: int) -> dict[str, list[int]]:
    """Each pattern's source positions for query q, written out by hand (position 0 only for first_token)."""
    out = {"first_token": [0] if q >= 1 else [], "previous_token": [q - 1] if q >= 2 else [],
           "current_token": [q] if q >= 1 else [],
           "duplicate_token": [k for k in range(1, q) if tok[k] == tok[q]],
           "induction": [k for k in range(2, q) if tok[k - 1] == tok[q]]}
    for o in (2, 3, 4):
        out[f"offset_{o}"] = [q - o] if q - o >= 1 else []
    return out


def test_recorded_masses_are_the_exact_attention_on_each_patterns_sources(known_heads):
    from chg_lens.explain.record import MASS_PATTERNS, record_batch

    g = torch.Generator().manual_seed(1)
    toks = torch.randint(4, len(VOCAB), (2, 24), generator=g)
    toks[:, 0] = 1
    toks[:, 13:21] = toks[:, 3:11]                                      # a repeated span: induction sources
    heads = [(0, 0), (1, 0), (1, 1)]
    with torch.no_grad():
        act, src, w, mass = record_batch(known_heads, toks, heads, top_sources=2)
        pats = {}
        models.run_with_hooks(known_heads, toks, [(models.pattern_hook_name(l), (lambda l: lambda x, hook:
                              pats.setdefault(l, x.clone()))(l)) for l in (0, 1)])
    assert mass.shape == (2, 24, 3, len(MASS_PATTERNS))
    for b in range(2):
        tok = toks[b].tolist()
        for q in range(24):
            for name, ks in brute_force_sources(tok, q).items():
                for n, (l, h) in enumerate(heads):
                    want = float(pats[l][b, h, q, ks].sum()) if ks else 0.0
                    got = float(mass[b, q, n, MASS_PATTERNS.index(name)])
                    assert abs(got - want) < 1e-5, (b, q, name, (l, h), got, want)
    # the strong induction head puts almost all its attention on the induction sources in the repeat
    assert mass[:, 14:21, 1, MASS_PATTERNS.index("induction")].min() > 0.9


def test_probes_score_the_known_heads(known_heads, tmp_path):
    from chg_lens.explain import load_probes, probe_scores, write_probes
    from chg_lens.explain.probes import probe_tokens

    toks, offset = probe_tokens(known_heads.tokenizer, n_sequences=3, length=15, seed=0)
    assert offset == 1 and toks.shape == (3, 31) and (toks[:, 0] == 1).all()
    assert torch.equal(toks[:, 1:16], toks[:, 16:]) and (toks[:, 1:] >= 4).all()     # no special tokens
    assert all(len(set(row[1:16].tolist())) == 15 for row in toks)                     # no repeat within a copy
    pr = probe_scores(known_heads, n_sequences=8, length=50, seed=0).set_index(["layer", "head"])
    assert pr.attrs["probe"]["length"] == 15                                           # cut to the context (32)
    assert len(pr) == 8
    assert pr.loc[(0, 0), "previous_token"] > 0.99 and pr.loc[(0, 0), "induction"] < 0.05
    assert pr.loc[(1, 0), "induction"] > 0.95 and pr.loc[(1, 0), "previous_token"] < 0.05
    assert 0.2 < pr.loc[(1, 1), "induction"] < 0.7 and pr.loc[(1, 1), "first_token"] > 0.5
    others = pr.drop([(1, 0), (1, 1)])
    assert others.induction.max() < 0.1 and others.duplicate_token.max() < 0.1
    assert pr.loc[(0, 1), "first_token"] > 0.6
    write_probes(pr.reset_index(), tmp_path / "probes.parquet")
    back = load_probes(tmp_path / "probes.parquet")
    assert back.equals(pr.reset_index()) and back.attrs["probe"]["references"]["induction"].startswith("Olsson")


def test_wikitext_offline_copy(known_heads):
    folder = SHARED_DATA / "wikitext-2"
    if not folder.exists():
        pytest.skip("no shared wikitext-2")
    w = sample_windows(known_heads, "wikitext", n_windows=4, window_len=8, wikitext_dir=str(folder))
    assert w.tokens.shape == (4, 8) and w.source == ["wikitext"] * 4


def test_pattern_explainer_names_known_heads_and_scores_them_high(pattern_run):
    out, _ = pattern_run
    raw = load_raw(out.path("raw_events.parquet"))
    assert raw.heads == [(0, 0), (0, 1), (1, 0), (1, 1)] and raw.activity.shape == (4, 40, N_POS)
    by_head = {(r["layer"], r["head"]): r for r in out.records}
    for head, pattern in KNOWN.items():
        rec = by_head[head]
        assert rec["hypothesis"]["pattern"] == pattern, rec["explanation"]
        assert rec["hypothesis"]["fit"] > (0.35 if head == (1, 1) else 0.8)
    assert "previous" in by_head[(0, 0)]["explanation"] and "'Ann'" in by_head[(0, 0)]["explanation"] or \
        "capitalized" in by_head[(0, 0)]["explanation"]
    assert "first token" in by_head[(0, 1)]["explanation"] and "induction" in by_head[(1, 0)]["explanation"]
    scores = out.scores.set_index(["layer", "head"])
    for head in KNOWN:
        assert scores.loc[head, "simulation_score"] > 0.85, (head, scores.loc[head].to_dict())
        assert scores.loc[head, "detection_score"] > 0.9
    # a wrong explanation scores low: each head simulated with another head's hypothesis
    _, held = split_windows(40)
    ex = PatternExplainer()
    for right, wrong in (((0, 0), (1, 0)), ((1, 0), (0, 1)), ((0, 1), (0, 0))):
        row = score_head(ex, by_head[wrong], raw, raw.head_index(*right), held)
        assert row["simulation_score"] < 0.3, (right, wrong, row)
    assert set(out.summary.columns) >= {"explanation", "simulation_score", "detection_score", "cluster"}


def test_sink_resting_induction_head_is_an_induction_head(pattern_run):
    """The issue's case: on this text the first token takes most of head 1.1's attention, so ranking by raw
    attention mass names it a first-token head; measured where induction has a source, against chance, it
    is an induction head that rests on the first token otherwise."""
    out, _ = pattern_run
    rec = {(r["layer"], r["head"]): r for r in out.records}[(1, 1)]
    fits = rec["hypothesis"]["fits"]
    assert fits["first_token"]["fit"] > 0.65 > fits["induction"]["fit"] > 0.35      # the sink dominates raw mass
    assert max(fits, key=lambda p: fits[p]["fit"]) == "first_token"                 # what raw mass would say
    assert fits["induction"]["excess"] > 0.3 and fits["induction"]["rest"] > 0.9
    text = rec["explanation"]
    assert text.startswith("Induction head: when the current token occurred before") and \
        "otherwise it rests on the first token" in text and "induction 0." in text   # probe quoted
    assert "First-token" not in text


def test_files_without_masses_fall_back_to_the_top_sources(pattern_run):
    out, _ = pattern_run
    raw = load_raw(out.path("raw_events.parquet"))
    raw.masses, raw.probes = None, None                                   # as a file from before masses/probes
    train, _ = split_windows(40)
    ex = PatternExplainer()
    for head, pattern in KNOWN.items():
        rec = ex.explain(raw, raw.head_index(*head), train)
        assert rec["hypothesis"]["pattern"] == pattern, rec["explanation"]
        assert "probe" not in rec["explanation"]


def test_scores_carry_probe_agreement_and_the_report_shows_it(pattern_run):
    from chg_lens.explain import probe_agreement

    out, _ = pattern_run
    raw = load_raw(out.path("raw_events.parquet"))
    assert raw.probes is not None and raw.masses is not None and raw.masses["induction"].dtype == np.float16
    sc = out.scores.set_index(["layer", "head"])
    assert sc.label.to_dict() == {(0, 0): "previous_token", (0, 1): "first_token", (1, 0): "induction",
                                  (1, 1): "induction"}
    probes = raw.probes.set_index(["layer", "head"])
    for head in KNOWN:
        assert sc.loc[head, "probe_score"] == pytest.approx(probes.loc[head, sc.loc[head, "label"]])
    assert sc.loc[(0, 0), "probe_percentile"] == 1.0 and sc.loc[(1, 0), "probe_percentile"] == 1.0
    agree = probe_agreement(out.scores, raw.probes).set_index("label")
    assert agree.loc["induction", "n_heads"] == 2 and agree.loc["induction", "auroc"] == 1.0
    assert agree.loc["previous_token", "auroc"] == 1.0
    assert agree.loc["induction", "mean_probe"] > 0.6 > 0.1 > agree.loc["induction", "mean_probe_others"]
    report = out.path("report.md").read_text()
    assert "## Probe agreement: does the label predict the probe score?" in report
    assert "| induction | 2 |" in report and "## Probe scores" in report
    assert {"label", "probe_induction", "probe_first_token"} <= set(out.summary.columns)


def test_output_sentence_names_only_tokens_that_stand_out():
    ex = PatternExplainer()
    fits = {p: {"fit": 0.0, "chance": 0.0, "excess": 0.0, "coverage": 1.0, "rest": 0.0}
            for p in ("previous_token", "first_token")}
    fits["previous_token"].update(fit=0.9, excess=0.85)
    hyp = {"pattern": "previous_token", "kind": "pattern", "fits": fits, "condition": "destination",
           "average": 1.0, "sd": 1.0, "default": 1.0,
           "table": {"tok:5": 1.1, "tok:6": 2.5, "tok:7": 6.0, "class:punctuation": 1.05, "class:start": 9.0},
           "counts": {"tok:5": 5000, "tok:6": 30, "tok:7": 2, "class:punctuation": 8000, "class:start": 50}}
    names = {5: ",", 6: " Paris", 7: " rare"}
    text = ex.output_text(hyp, names)
    assert "' Paris' (2.5x)" in text and "','" not in text and "rare" not in text and "punctuation" not in text
    hyp["table"]["tok:6"] = 1.2
    assert ex.output_text(hyp, names).startswith("; its output is not token-specific")
    hyp["table"]["tok:5"] = 2.0                                        # a frequent token that really stands out
    assert "',' (2.0x)" in ex.output_text(hyp, names)
    # token means are taken where the pattern applies: they are compared with the mean there ("on")
    hyp["table"].update({"on": 2.0, "off": 0.5})
    hyp["counts"].update({"on": 6000, "off": 2000})
    text = ex.output_text(hyp, names)
    assert text.startswith("; its output is 4.0x larger where the pattern applies, and not token-specific")


def test_labels_read_from_free_text():
    from chg_lens.explain import label_from_text

    assert label_from_text("Copies the token that followed an earlier occurrence (an induction head).") == "induction"
    assert label_from_text("Attends to the previous token.") == "previous_token"
    assert label_from_text("Attends to earlier occurrences of the same token.") == "duplicate_token"
    assert label_from_text("Mostly attends to the BOS token.") == "first_token"
    assert label_from_text("Looks 3 tokens back.") == "offset_3"
    assert label_from_text("Fires on numbers.") == "none"


def test_report_joins_chg_roles(pattern_run, tmp_path):
    from chg_lens.chg import CHGResult

    out, text = pattern_run
    g = torch.zeros(2, 2, 4)
    logits = {"g0": g, "g_plus": torch.full((2, 2, 4), 5.0), "g_minus": torch.full((2, 2, 4), -5.0)}
    logits["g_minus"][:, 0, 0] = 5.0                                   # head 0.0 facilitating
    res = CHGResult(logits=logits, traces={k: {} for k in logits}, snapshots={k: torch.zeros(0, 2, 2, 4) for k in logits},
                    snapshot_steps={k: torch.zeros(0, dtype=torch.long) for k in logits}, config={"updates": 1, "reg_updates": 1,
                    "batch_size": 1, "lam": 0.1}, meta={"task": "ioi", "model": recorded_model(out.outdir)},
                    validation=None)  # a fit of the explained model (another model's fit is refused)
    res.save(tmp_path / "chg")
    outdir = copy_outputs(out.outdir, tmp_path / "out", CACHED)
    run = run_explain(None, outdir, small_config(text, chg_result=str(tmp_path / "chg")), skip_cache=True,
                      skip_explain=True, skip_simulate=True, skip_cluster=True, progress=False)
    row = run.summary.set_index(["layer", "head"]).loc[(0, 0)]
    assert row.role == "facilitating" and row.facilitation > 0.99
    assert run.summary.set_index(["layer", "head"]).loc[(1, 0)].role == "irrelevant"
    report = (outdir / "report.md").read_text()
    assert "layer 0 head 0 is facilitating for ioi: Previous-token head" in report
    assert "(simulation score " in report
    from chg_lens.explain import write_explain_report, write_report
    (tmp_path / "old").mkdir()
    with pytest.warns(DeprecationWarning, match="write_explain_report"):
        old = write_report(run.summary, (tmp_path / "old").resolve(), task="ioi", title="t")
    new = write_explain_report(run.summary, tmp_path, task="ioi", title="t")
    assert [p.read_text() for p in old] == [p.read_text() for p in new]
    assert "layer 0 head 0 is facilitating for ioi" in new[0].read_text()


def recorded_model(outdir: Path) -> str:
    from chg_lens.explain import load_raw

    return load_raw(outdir / "raw_events.parquet").meta["model"]


CACHED = ("raw_events.parquet", "explanations.jsonl", "scores.parquet", "clusters.json", "probes.parquet")


def copy_outputs(src: Path, dst: Path, names) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dst / n).write_bytes((src / n).read_bytes())
    return dst


def test_second_run_with_skip_flags_recomputes_nothing(pattern_run, monkeypatch):
    out, text = pattern_run
    names = ["raw_events.parquet", "probes.parquet", "explanations.jsonl", "scores.parquet", "clusters.json",
             "report.md", "summary.csv"]
    before = {n: (out.outdir / n).read_bytes() for n in names}

    def boom(*a, **k):
        raise AssertionError("recomputed a skipped step")

    for name in ("record_to_parquet", "sample_windows", "score_all", "cluster_explanations", "make_explainer"):
        monkeypatch.setattr(pipeline_mod, name, boom)
    monkeypatch.setattr(PatternExplainer, "explain", boom)
    again = run_explain(None, out.outdir, small_config(text), skip_cache=True, skip_explain=True,
                        skip_simulate=True, skip_cluster=True, progress=False)
    assert again.steps_run == ["report"]
    assert {n: (out.outdir / n).read_bytes() for n in names} == before
    with pytest.raises(FileNotFoundError, match="run once without --skip-cache"):
        run_explain(None, out.outdir / "empty", small_config(text), skip_cache=True, skip_explain=True, progress=False)


# ----------------------------------------------------------------------------- OpenAI-compatible server
class FakeOpenAI:
    """A chat-completions endpoint on 127.0.0.1: answers from a script of (status, text) replies, then
    the default; records every request."""

    def __init__(self, script=(), explain_text="Explanation: attends to the previous token.",
                 simulate_text="1: 10\n2: 0\n3: 5"):
        self.script, self.requests = list(script), []
        self.explain_text, self.simulate_text = explain_text, simulate_text
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                status, text = fake.script.pop(0) if fake.script else (200, None)
                if text is None:
                    system = body["messages"][0]["content"]
                    text = fake.simulate_text if "predict" in system.lower() else fake.explain_text
                if status != 200:
                    payload = {"error": {"message": "busy", "type": "server_error", "code": status}}
                else:
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


KEY = "sk-test-THIS-KEY-MUST-NOT-LEAK-1234"


def test_openai_explainer_request_parse_retry_and_no_key_in_files(pattern_run, tmp_path, monkeypatch):
    pytest.importorskip("openai")
    out, text = pattern_run
    fake = FakeOpenAI(script=[(429, None), (500, None)])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    try:
        outdir = copy_outputs(out.outdir, tmp_path / "llm", ["raw_events.parquet", "probes.parquet", "clusters.json"])
        cfg = small_config(text, explainer="openai", base_url=fake.url, llm_model="judge-1", llm_backoff=0.01,
                           llm_retries=2, sim_windows=2, topk=5)
        run = run_explain(None, outdir, cfg, skip_cache=True, skip_cluster=True, progress=False)
    finally:
        fake.close()
    first = fake.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "judge-1"
    roles = [m["role"] for m in first["body"]["messages"]]
    assert roles == ["system", "user"] and "[[" in first["body"]["messages"][1]["content"]
    # the prompt carries the pattern evidence against chance, the resting state and the probe scores
    prompt = first["body"]["messages"][1]["content"]
    assert "Resting state:" in prompt and "previous token 100% (chance" in prompt
    assert "Probe scores on repeated random tokens" in prompt and "previous-token 1.00" in prompt
    # 429 then 500 were retried: 4 heads explained with 2 extra requests, then 2 simulated windows per head
    assert len(fake.requests) == 4 + 2 + 4 * 2
    assert [r["status"] for r in run.records] == ["ok"] * 4
    assert run.scores.label.tolist() == ["previous_token"] * 4     # read from the (fake) LLM's sentence
    assert run.records[0]["explanation"] == "attends to the previous token."
    assert run.records[0]["llm_model"] == "judge-1"
    sim = [r for r in fake.requests if "predict" in r["body"]["messages"][0]["content"].lower()]
    assert len(sim) == 8 and "0: '<bos>'" in sim[0]["body"]["messages"][1]["content"]
    assert np.isfinite(run.scores.simulation_score).all()
    for f in outdir.iterdir():
        assert KEY.encode() not in f.read_bytes(), f.name


def test_openai_failed_head_is_recorded_not_fatal(pattern_run, monkeypatch, tmp_path):
    pytest.importorskip("openai")
    out, text = pattern_run
    fake = FakeOpenAI(script=[(500, None)] * 2 + [(400, None)])
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    try:
        ex = OpenAIExplainer(model="m", base_url=fake.url, max_retries=1, backoff=0.01)
        raw = load_raw(out.path("raw_events.parquet"))
        train, held = split_windows(40)
        rec = ex.explain(raw, 0, train, pipeline_mod.salient_events(raw, 0, train, 5))
        assert rec["status"] == "failed" and "2 attempts" in rec["error"] and KEY not in rec["error"]
        rec400 = ex.explain(raw, 1, train, pipeline_mod.salient_events(raw, 1, train, 5))
        assert rec400["status"] == "failed" and "400" in rec400["error"]
        row = score_head(ex, rec, raw, 0, held)
        assert row["status"] == "failed" and np.isnan(row["simulation_score"])
    finally:
        fake.close()
    assert len(fake.requests) == 3


def test_parsers():
    assert parse_explanation("Sure.\nExplanation: \"Copies names.\"") == "Copies names."
    assert parse_explanation("It copies names.") == "It copies names."
    assert parse_simulation("0: 1\n2: 7.5\nnoise\n9: 3", 3).tolist() == [1.0, 0.0, 7.5]



# ----------------------------------------------------------------------------- the explainer protocol
class PositionExplainer:
    """An explainer of one's own (the protocol's example): every head is a previous-token head whose
    activity grows with the position."""

    name = "position"

    def explain(self, raw, head_index, windows, events):
        layer, head = raw.heads[head_index]
        return {"layer": layer, "head": head, "explainer": self.name, "status": "ok", "error": None,
                "explanation": "Previous-token head: attends to the token just before it.", "hypothesis": None}

    def predict(self, record, tokens, token_str):
        return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.float64), tokens.shape)


def test_both_explainers_and_ones_own_satisfy_the_protocol(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(PatternExplainer(), Explainer)
    assert isinstance(OpenAIExplainer(base_url="http://127.0.0.1:9/v1"), Explainer)   # no request is made
    assert isinstance(PositionExplainer(), Explainer)

    class NoPredict:
        name = "half"

        def explain(self, raw, head_index, windows, events):
            return {}

    assert not isinstance(NoPredict(), Explainer)
    assert not isinstance(object(), Explainer)


def test_ones_own_explainer_runs_through_the_pipeline(pattern_run, tmp_path):
    out, text = pattern_run
    outdir = copy_outputs(out.outdir, tmp_path / "own", ["raw_events.parquet", "probes.parquet", "clusters.json"])
    cfg = small_config(text)
    run = run_explain(None, outdir, cfg, skip_cache=True, skip_cluster=True, explainer=PositionExplainer(),
                      progress=False)
    assert run.steps_run == ["explain", "simulate", "report"]
    assert [r["explainer"] for r in run.records] == ["position"] * 4
    assert run.scores.explainer.tolist() == ["position"] * 4
    assert run.scores.label.tolist() == ["previous_token"] * 4          # read from the sentence
    raw = load_raw(outdir / "raw_events.parquet")
    _, held = split_windows(raw.tokens.shape[0], cfg.holdout_fraction)
    for row in run.scores.itertuples():
        real = raw.activity[raw.head_index(row.layer, row.head)][held].astype(np.float64)
        pos = np.broadcast_to(np.arange(real.shape[1], dtype=np.float64), real.shape)
        assert row.n_windows == len(held) and row.n_tokens == real.size
        assert row.simulation_score == pytest.approx(np.corrcoef(pos.reshape(-1), real.reshape(-1))[0, 1], abs=1e-9)


def test_split_modules_keep_every_name_of_explainers():
    from chg_lens.explain import explainers, llm, pattern_explainer, patterns, protocol
    from chg_lens.explain.events import context

    homes = {patterns: ["PATTERN_TEXT", "PATTERNS", "pattern_text", "pattern_name", "pattern_sources", "_topk_masses",
                        "pattern_fits", "correlation"],
             pattern_explainer: ["WHEN_TEXT", "HEAD_NAMES", "PatternExplainer", "label_of", "_TEXT_LABELS",
                                 "label_from_text", "_round"],
             llm: ["EXPLAIN_SYSTEM", "SIMULATE_SYSTEM", "LLMError", "OpenAIExplainer", "evidence_lines", "_retry_after",
                   "parse_explanation", "parse_simulation"],
             protocol: ["Explainer"]}
    for module, names in homes.items():
        for name in names:
            obj = getattr(module, name)
            assert getattr(explainers, name) is obj, name
            if callable(obj):                                   # defined there, not imported from elsewhere
                assert obj.__module__ == module.__name__, name
    assert explainers.show_context is context
    assert all(hasattr(explainers, name) for name in explainers.__all__)

def test_cli_explain(pattern_run, tmp_path, capsys):
    from chg_lens.cli import main

    out, text = pattern_run
    outdir = copy_outputs(out.outdir, tmp_path / "cli", CACHED[:3])
    args = ["explain", "--sources", str(text), "--outdir", str(outdir), "--skip-cache", "--skip-explain",
            "--skip-simulate", "--min-cluster-size", "2", "--no-progress"]
    assert main(args) == 0
    assert json.loads((outdir / "clusters.json").read_text())["min_cluster_size"] == 2
    assert "summary.csv" in capsys.readouterr().out
    assert main(["explain", "--sources", "stackexchange", "--outdir", str(outdir)]) == 2
    assert "stackexchange-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_top_probe_induction_heads_get_the_induction_label(smollm2, tmp_path):
    """The issue's measurement: on WikiText the heads with the highest probe induction scores were all named
    "First-token (BOS) head"; now they are induction heads, and the top previous-token heads stay so."""
    from chg_lens.explain import probe_scores

    pr = probe_scores(smollm2, n_sequences=10, length=50)
    ind = pr.sort_values("induction", ascending=False).head(4)
    prev = pr.sort_values("previous_token", ascending=False).head(2)
    assert ind.induction.min() > 0.5 and prev.previous_token.min() > 0.7
    heads = [(int(l), int(h)) for l, h in pd.concat([ind, prev])[["layer", "head"]].values]
    cfg = ExplainConfig(sources="wikitext", wikitext_dir=str(SHARED_DATA / "wikitext-2"), n_windows=40,
                        window_len=96, topk=50, heads=heads, max_heads=None, min_cluster_size=2, batch_size=8)
    out = run_explain(smollm2, tmp_path, cfg, progress=False)
    sc = out.scores.set_index(["layer", "head"])
    texts = {(r["layer"], r["head"]): r["explanation"] for r in out.records}
    for head in heads[:4]:
        assert sc.loc[head, "label"] == "induction", texts[head]
        assert texts[head].startswith("Induction head") and "rests on the first token" in texts[head]
    for head in heads[4:]:
        assert sc.loc[head, "label"] == "previous_token", texts[head]
    probes = pd.read_parquet(tmp_path / "probes.parquet").set_index(["layer", "head"])
    assert probes.loc[heads[0], "induction"] == pytest.approx(ind.induction.iloc[0], abs=1e-6)   # same probes
    assert sc.loc[heads[0], "probe_percentile"] == 1.0 and sc.loc[heads[4], "probe_percentile"] == 1.0


@pytest.mark.slow
def test_smollm2_writes_every_file(smollm2, tmp_path):
    cfg = ExplainConfig(sources="wikitext", wikitext_dir=str(SHARED_DATA / "wikitext-2"), n_windows=6,
                        window_len=48, topk=10, max_heads=4, min_cluster_size=2, batch_size=6)
    out = run_explain(smollm2, tmp_path, cfg, progress=False)
    for n in ("raw_events.parquet", "explanations.jsonl", "scores.parquet", "clusters.json", "report.md",
              "summary.csv"):
        assert (tmp_path / n).stat().st_size > 0, n
    assert len(out.records) == 4 and all(r["status"] == "ok" and r["explanation"] for r in out.records)
    assert out.scores.simulation_score.notna().all()
