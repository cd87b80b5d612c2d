"""The task library on real tokenizers (GPT-2 from the shared data, SmolLM2 from its GGUF): loss on
exactly the target tokens, example counts and formats, disjoint splits, seeded data."""

from __future__ import annotations

import re

import pytest
import torch

from chg_lens import models, tasks
from chg_lens.data import TaskDataset
from chg_lens.tasks import common
from chg_lens.tasks.function_vectors import INSTRUCTIONS

from conftest import SHARED_DATA, gpt2_tokenizer

FV = SHARED_DATA / "function_vectors"


@pytest.fixture(scope="session")
def smollm2_tokenizer(request):
    """The SmolLM2 tokenizer without the model. Reading the GGUF's metadata takes ~30 s, so the
    tokenizer is saved once in pytest's cache folder and reloaded from there (< 1 s) afterwards."""
    from transformers import AutoTokenizer

    try:
        path = models.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    folder = request.config.cache.mkdir(f"smollm2_tokenizer_{path.stat().st_size}")
    if not (folder / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def gpt2_tok():
    return gpt2_tokenizer()


@pytest.fixture(params=["gpt2", "smollm2"])
def tok(request, gpt2_tok):
    return gpt2_tok if request.param == "gpt2" else request.getfixturevalue("smollm2_tokenizer")


# ----------------------------------------------------------------------------- shared checks
def target_text(tok, data: TaskDataset, i: int) -> str:
    return tok.decode(data.tokens[i][data.loss_mask[i]])


def check_splits(train: TaskDataset, val: TaskDataset) -> None:
    rows = lambda d: {tuple(r[: int(n)].tolist()) for r, n in zip(d.tokens, d.lengths)}
    assert rows(train).isdisjoint(rows(val))
    assert len(train) > len(val) > 0


def check_seeds(fn, *args, **kwargs) -> None:
    a, b, c = fn(*args, seed=0, **kwargs), fn(*args, seed=0, **kwargs), fn(*args, seed=1, **kwargs)
    a, b, c = (x if isinstance(x, TaskDataset) else x.train for x in (a, b, c))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def check_mask_is_suffix(data: TaskDataset) -> None:
    """Targets are the contiguous tail of each row (nothing after them but padding)."""
    for m, n in zip(data.loss_mask, data.lengths):
        idx = m.nonzero().flatten()
        assert int(idx[-1]) == int(n) - 1 and len(idx) == int(idx[-1] - idx[0]) + 1


# ----------------------------------------------------------------------------- few-shot helper
def test_few_shot_prompt_format():
    p, t = tasks.few_shot_prompt([("hot", "cold"), ("up", "down")], "big", "small")
    assert p == "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:" and t == " small"
    p, t = tasks.few_shot_prompt([("hot", "cold")], "big", "small", instruction="Opposites.")
    assert p == "Opposites.\n\nQ: hot\nA: cold\n\nQ: big\nA:"


def test_too_long_rows_dropped_with_count_or_refused(gpt2_tok):
    prompts, targets = ["a " * 5, "a " * 50, "a " * 3], [" b", " b", " b"]
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        data = common.prompt_dataset(gpt2_tok, prompts, targets, "t", {"k": [0, 1, 2]}, max_length=20)
    assert len(data) == 2 and data.row_meta["k"] == [0, 2] and data.meta["n_dropped_too_long"] == 1
    with pytest.raises(ValueError, match="all 3 rows are longer"):
        common.prompt_dataset(gpt2_tok, prompts, targets, "t", max_length=3)


# ----------------------------------------------------------------------------- function vectors
@pytest.mark.parametrize("fmt", ["icl", "instruction"])
def test_fv_format_mask_and_pool(tok, fmt):
    train, val = tasks.function_vector(tok, "antonym", fmt, n_prompts=40, data_dir=FV)
    check_splits(train, val)
    for d in (train, val):
        check_mask_is_suffix(d)
        for i in range(len(d)):
            prompt = d.prompts[i][: -len(" " + d.row_meta["answer"][i])]
            assert target_text(tok, d, i).strip() == d.row_meta["answer"][i]
            assert prompt.endswith(f"Q: {d.row_meta['query'][i]}\nA:")
            n_q = prompt.count("Q: ")
            if fmt == "icl":
                assert n_q == 11 and prompt.startswith("Q: ")
                blocks = prompt.split("\n\n")
                assert len(blocks) == 11 and all(b.count("\nA: ") == 1 for b in blocks[:-1])
            else:
                x, y = d.row_meta["instruction_example"][i]
                assert n_q == 2 and prompt.startswith(f"{INSTRUCTIONS['antonym']}\n\nQ: {x}\nA: {y}\n\nQ: ")
                assert x != d.row_meta["query"][i]
            # the query is never one of the example-pool inputs
            assert all(x != d.row_meta["query"][i] for x, _ in d.row_meta["examples"][i])
            pos = d.row_meta["query_pos"][i]
            assert not d.loss_mask[i, pos] and d.loss_mask[i, pos + 1]


def test_fv_seeds_and_data_errors(gpt2_tok, tmp_path):
    check_seeds(tasks.function_vector, gpt2_tok, "country-capital", n_prompts=30, data_dir=FV)
    with pytest.raises(ValueError, match="data_dir"):
        tasks.function_vector(gpt2_tok, "antonym")
    with pytest.raises(FileNotFoundError, match="no-such-task.json"):
        tasks.function_vector(gpt2_tok, "no-such-task", data_dir=FV)
    bad = tmp_path / "pairs.json"
    bad.write_text('[{"question": "a", "output": "b"}]')
    with pytest.raises(ValueError, match="missing column"):
        tasks.function_vector(gpt2_tok, data_dir=bad)
    own = tmp_path / "double.json"
    own.write_text("[" + ",".join(f'{{"input": "{i}", "output": "{2 * i}"}}' for i in range(40)) + "]")
    with pytest.raises(ValueError, match="instruction="):
        tasks.function_vector(gpt2_tok, "double", "instruction", n_prompts=20, data_dir=own)
    tr, va = tasks.function_vector(gpt2_tok, "double", "instruction", n_prompts=20, data_dir=own,
                                   instruction="Double the number.")
    assert tr.prompts[0].startswith("Double the number.\n\nQ: ")


def test_fv_formats_are_row_matched_and_split_alike(tok):
    f = tasks.fv_formats(tok, "singular-plural", n_prompts=30, data_dir=FV)
    icl, ins = f["icl"], f["instruction"]
    assert len(icl) == len(ins) == 30
    assert icl.row_meta["query"] == ins.row_meta["query"]
    for i in range(len(icl)):
        assert target_text(tok, icl, i) == target_text(tok, ins, i)
        assert icl.prompts[i].count("Q: ") == 11 and ins.prompts[i].count("Q: ") == 2
    (a_tr, a_va), (b_tr, b_va) = icl.split(0.2, 3), ins.split(0.2, 3)
    assert a_tr.row_meta["query"] == b_tr.row_meta["query"] and a_va.row_meta["query"] == b_va.row_meta["query"]


def test_fv_pairs_shuffle_answers_keep_lengths(tok):
    clean, corrupted = tasks.fv_pairs(tok, "antonym", n_prompts=16, data_dir=FV)
    assert len(clean) == len(corrupted) >= 14
    assert torch.equal(clean.lengths, corrupted.lengths)
    assert torch.equal(clean.loss_mask, corrupted.loss_mask)
    for i in range(len(clean)):
        c_blocks = clean.prompts[i].split("\n\n")
        k_blocks = corrupted.prompts[i].split("\n\n")
        assert c_blocks[-1] == k_blocks[-1]  # same query and target
        c_in = [b.split("\nA: ")[0] for b in c_blocks[:-1]]
        c_out = [b.split("\nA: ")[1] for b in c_blocks[:-1]]
        k_in = [b.split("\nA: ")[0] for b in k_blocks[:-1]]
        k_out = [b.split("\nA: ")[1] for b in k_blocks[:-1]]
        assert c_in == k_in and sorted(c_out) == sorted(k_out)
        assert all(k_out[j] == c_out[p] for j, p in enumerate(corrupted.row_meta["shuffle"][i]))
        assert all(p != j for j, p in enumerate(corrupted.row_meta["shuffle"][i]))
        q = clean.row_meta["query_pos"][i]
        assert int(clean.tokens[i, q + 1]) == clean.row_meta["target_id"][i]


# ----------------------------------------------------------------------------- ABA / ABB
def test_aba_abb_structure(tok):
    train, val = tasks.aba_abb(tok, n_prompts=24, seed=0)
    check_splits(train, val)
    sep = tok("^", add_special_tokens=False)["input_ids"][0]
    nl = tok("\n", add_special_tokens=False)["input_ids"][0]
    rules = train.row_meta["rule"] + val.row_meta["rule"]
    assert rules.count("ABA") == rules.count("ABB") == 12
    for d in (train, val):
        assert bool((d.n_targets == 1).all())
        for i in range(len(d)):
            n = int(d.lengths[i])
            row = d.tokens[i, :n].tolist()
            start = n - 29  # 4 examples x 6 tokens + query (5 tokens incl. answer); BOS when the tokenizer adds one
            assert start in (0, 1) and (start == 0 or row[0] == tok.bos_token_id)
            body = row[start:]
            words = d.row_meta["words"][i]
            assert len(set(words)) == 10
            for w in words:  # each word is one token that round-trips
                assert tok(tok.decode([w]), add_special_tokens=False)["input_ids"] == [w]
            for k in range(4):
                a, s1, b, s2, c, br = body[6 * k: 6 * k + 6]
                assert (s1, s2, br) == (sep, sep, nl) and [a, b] == words[2 * k: 2 * k + 2]
                assert c == (a if d.row_meta["rule"][i] == "ABA" else b)
            qa, s1, qb, s2, ans = body[24:]
            correct, wrong = d.row_meta["answers"][i]
            assert ans == correct and {correct, wrong} == {qa, qb} and (s1, s2) == (sep, sep)
            assert correct == (qa if d.row_meta["rule"][i] == "ABA" else qb)
            assert d.loss_mask[i, n - 1] and d.row_meta["query_pos"][i] == n - 2


def test_aba_abb_seeded_and_rows_api(gpt2_tok):
    check_seeds(tasks.aba_abb, gpt2_tok, n_prompts=10)
    rows = tasks.aba_abb_rows(gpt2_tok, 4, seed=5)
    assert rows == tasks.aba_abb_rows(gpt2_tok, 4, seed=5)
    flipped = tasks.aba_abb_dataset(gpt2_tok, [r.with_rule("ABB" if r.rule == "ABA" else "ABA") for r in rows])
    same = tasks.aba_abb_dataset(gpt2_tok, rows)
    assert torch.equal(flipped.lengths, same.lengths)
    assert [a[::-1] for a in same.row_meta["answers"]] == flipped.row_meta["answers"]
    with pytest.raises(ValueError, match="not one"):
        tasks.aba_abb_dataset(gpt2_tok, rows, separator=" ^^^ xyz")


def test_symbolic_pairs_live_in_tasks(gpt2_tok):
    from chg_lens import patching

    assert patching.symbolic_pairs is tasks.symbolic_pairs and patching.SYMBOLIC_KINDS == tasks.SYMBOLIC_KINDS
    clean, corrupted, pos = tasks.symbolic_pairs(gpt2_tok, "induction", n_prompts=6, seed=2)
    assert pos == "last" and torch.equal(clean.lengths, corrupted.lengths) and len(clean) == 6
    # the corrupted prompt has the other rule: its answer is the clean prompt's other query word
    assert [a[1] for a in clean.row_meta["answers"]] == [a[0] for a in corrupted.row_meta["answers"]]
    assert clean.row_meta["rule"] == ["ABA", "ABB"] * 3 and corrupted.row_meta["rule"] == ["ABB", "ABA"] * 3
    _, _, mask = tasks.symbolic_pairs(gpt2_tok, "abstraction", n_prompts=4, seed=2)
    assert mask.sum(1).tolist() == [4] * 4  # each example's third word
    swapped, other, pos = tasks.symbolic_pairs(gpt2_tok, "retrieval", n_prompts=4, seed=2)
    assert pos == "last" and other.row_meta["rule"] == swapped.row_meta["rule"]
    with pytest.raises(ValueError, match="kind must be one of"):
        tasks.symbolic_pairs(gpt2_tok, "copying")


# ----------------------------------------------------------------------------- CommonsenseQA
def test_csqa_letters_shuffled_one_example(tok):
    train, val = tasks.commonsense_qa(tok, n_prompts=30, data_dir=FV)
    check_splits(train, val)
    assert len(val) == 3  # 90/10
    moved = 0
    for d in (train, val):
        check_mask_is_suffix(d)
        for i in range(len(d)):
            blocks = d.prompts[i].split("\n\n")
            assert len(blocks) == 2 and blocks[0].startswith("Question: ") and blocks[1].startswith("Question: ")
            letter = d.row_meta["answer"][i]
            assert target_text(tok, d, i) == " " + letter and blocks[1].endswith("Answer: " + letter)
            assert [ln[:3] for ln in blocks[1].split("\n")[-6:-1]] == ["A. ", "B. ", "C. ", "D. ", "E. "]
            assert d.row_meta["answers"][i][0] == int(d.tokens[i][d.loss_mask[i]][-1])
            moved += letter != "abcde"[0].upper()
    assert 0 < moved < 30  # shuffled: the right letter is not always the same
    check_seeds(tasks.commonsense_qa, tok, n_prompts=8, data_dir=FV)


# ----------------------------------------------------------------------------- BIG-bench syntax
@pytest.mark.parametrize("record, message", [
    ({"input": "walk", "target": "  "}, "record 2: empty target"),
    ({"input": None, "target": "walked"}, "record 2: missing input"),
    ({"target": "walked"}, "record 2: a record without 'input'"),
    ({"input": "walk"}, "record 2: a record without 'target' or 'target_scores'"),
])
def test_bigbench_syntax_names_the_bad_record(tok, tmp_path, record, message):
    import json

    from chg_lens.tasks import bigbench

    (tmp_path / "tense").mkdir()
    (tmp_path / "tense" / "task.json").write_text(json.dumps({"examples": [{"input": "go", "target": "went"}, record]}))
    with pytest.raises(ValueError, match=re.escape(f"task.json, {message}")):
        bigbench.load_subtask("tense", tmp_path)


def test_bigbench_syntax_instructions_and_subtasks(tok):
    from chg_lens.tasks.bigbench import INSTRUCTIONS as BB

    train, val = tasks.bigbench_syntax(tok, n_prompts=35, data_dir=SHARED_DATA / "bigbench")
    check_splits(train, val)
    subtasks = train.row_meta["subtask"] + val.row_meta["subtask"]
    assert all(subtasks.count(s) == 5 for s in BB)
    for d in (train, val):
        check_mask_is_suffix(d)
        for i in range(len(d)):
            blocks = d.prompts[i].split("\n\n")
            assert blocks[0] == BB[d.row_meta["subtask"][i]] and len(blocks) == 3
            assert blocks[1].startswith("Input: ") and "\nOutput: " in blocks[1]
            assert target_text(tok, d, i) == " " + d.row_meta["answer"][i]
    check_seeds(tasks.bigbench_syntax, tok, "plural", n_prompts=8, data_dir=SHARED_DATA / "bigbench")
    with pytest.raises(ValueError, match="unknown BIG-bench"):
        tasks.bigbench_syntax(tok, "nope", data_dir=SHARED_DATA / "bigbench")


# ----------------------------------------------------------------------------- math
def test_math_cot_gsm8k_format(tok):
    from chg_lens.tasks.math_cot import INSTRUCTION, gsm8k_solution

    assert gsm8k_solution("a = <<2*3=6>>6 b\n#### 1,000") == "a = 6 b\nThe final answer is \\boxed{1000}."
    train, val = tasks.math_cot(tok, n_prompts=30, data_dir=SHARED_DATA / "gsm8k")
    check_splits(train, val)
    for d in (train, val):
        check_mask_is_suffix(d)
        for i in range(len(d)):
            blocks = d.prompts[i].split("\n\nProblem: ")
            assert blocks[0] == INSTRUCTION and len(blocks) == 3
            target = target_text(tok, d, i)
            assert target.startswith(" ") and "\\boxed{" in target and "<<" not in target
            assert d.prompts[i].endswith("\nSolution:" + target)
            assert int(d.n_targets[i]) > 10  # the whole solution is supervised
    check_seeds(tasks.math_cot, tok, n_prompts=10, data_dir=SHARED_DATA / "gsm8k")


def test_openmath_records_filtered(monkeypatch, gpt2_tok):
    import importlib

    m = importlib.import_module("chg_lens.tasks.math_cot")  # the package attribute is the function

    rows = [{"problem": f"What is {i}+{i}?", "generated_solution": f"It is $\\boxed{{{2 * i}}}$.", "expected_answer": str(2 * i)}
            for i in range(20)]
    rows += [{"problem": "What is 0+0?", "generated_solution": "dup", "expected_answer": "0"},
             {"problem": "x?", "generated_solution": "", "expected_answer": "1"},
             {"problem": "y?", "generated_solution": "none", "expected_answer": "No solution"}]
    assert len(m.openmath_pairs(rows)) == 20
    monkeypatch.setattr(m, "load_hf_dataset", lambda name, split, config=None: rows)
    train, val = tasks.math_cot(gpt2_tok, "openmathinstruct2", n_prompts=10, pool_size=5, split="train_1M")
    assert len(train) + len(val) == 10 and "\\boxed{" in target_text(gpt2_tok, train, 0)


# ----------------------------------------------------------------------------- induction
def test_induction_repeated_half(tok):
    train, val = tasks.induction(tok, n_prompts=12, seq_len=8)
    check_splits(train, val)
    for d in (train, val):
        for i in range(len(d)):
            s = d.row_meta["repeat_start"][i]
            row = d.tokens[i].tolist()
            assert row[s - 8:s] == row[s:s + 8] and len(set(row[s:s + 8])) == 8
            assert d.loss_mask[i].nonzero().flatten().tolist() == list(range(s + 1, s + 8))
    check_seeds(tasks.induction, tok, n_prompts=6, seq_len=5)


# ----------------------------------------------------------------------------- plain language modelling
def test_lm_windows_every_token(tok, tmp_path):
    text = " ".join(f"word{i % 97} is number {i}." for i in range(600))
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    train, val = tasks.language_modeling(tok, n_prompts=10, window=16, data_dir=f)
    check_splits(train, val)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for d in (train, val):
        for i in range(len(d)):
            row = d.tokens[i].tolist()
            start = d.row_meta["window_start"][i]
            body = row[-16:]
            assert body == ids[start:start + 16]
            assert int(d.n_targets[i]) == (16 if len(row) == 17 else 15)
    check_seeds(tasks.language_modeling, tok, n_prompts=4, window=16, data_dir=f)
    with pytest.raises(ValueError, match="windows"):
        tasks.language_modeling(tok, n_prompts=10_000, window=16, data_dir=f)


def test_lm_wikitext(gpt2_tok):
    train, val = tasks.language_modeling(gpt2_tok, n_prompts=8, window=32, data_dir=SHARED_DATA / "wikitext-2", split="valid",
                                           max_chars=20_000)
    assert len(train) + len(val) == 8 and bool((train.n_targets == 31).all())


# ----------------------------------------------------------------------------- your own data
@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "tsv", "parquet"])
def test_custom_file_formats(gpt2_tok, tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"q": [f"{i} plus one is" for i in range(30)], "a": [str(i + 1) for i in range(30)]})
    f = tmp_path / f"data.{suffix}"
    {"json": lambda: frame.to_json(f, orient="records"), "jsonl": lambda: frame.to_json(f, orient="records", lines=True),
     "csv": lambda: frame.to_csv(f, index=False), "tsv": lambda: frame.to_csv(f, sep="\t", index=False),
     "parquet": lambda: frame.to_parquet(f)}[suffix]()
    train, val = tasks.from_file(gpt2_tok, f, "q", "a")
    assert len(train) + len(val) == 30
    for d in (train, val):
        for i in range(len(d)):
            n = int(d.prompts[i].split(" ")[0])
            assert target_text(gpt2_tok, d, i) == f" {n + 1}" and d.prompts[i] == f"{n} plus one is {n + 1}"
    with pytest.raises(ValueError, match="missing column"):
        tasks.from_file(gpt2_tok, f, "question", "a")


def test_custom_few_shot_uses_shared_format(gpt2_tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(f'{{"input": "w{i}", "output": "W{i}"}}' for i in range(40)))
    train, _ = tasks.from_file(gpt2_tok, f, n_shots=3, n_prompts=20, instruction="Upper-case it.")
    p = train.prompts[0]
    assert p.startswith("Upper-case it.\n\nQ: w") and p.count("Q: ") == 4
    expected, _ = tasks.few_shot_prompt([], "x", "X")
    assert expected == "Q: x\nA:"
    with pytest.raises(FileNotFoundError):
        tasks.from_file(gpt2_tok, tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="data_dir"):
        tasks.from_file(gpt2_tok)


# ----------------------------------------------------------------------------- CLI
def test_every_task_builds_through_cli_helper(gpt2_tok, tmp_path):
    from chg_lens.cli.options import task_options as parse_task_options

    f = tmp_path / "d.csv"
    f.write_text("input,output\n" + "\n".join(f"{i} then,{i + 1}" for i in range(20)))
    dirs = {"fv": FV, "csqa": FV, "bigbench_syntax": SHARED_DATA / "bigbench", "math_cot": SHARED_DATA / "gsm8k",
            "lm": SHARED_DATA / "wikitext-2", "custom": f}
    opts = {"fv": ["task=capitalize", "fmt=instruction"], "bigbench_syntax": ["subtask=tense"], "lm": ["window=16", "max_chars=20000"],
            "induction": ["seq_len=6"]}
    assert set(tasks.list_tasks()) >= {"aba_abb", "bigbench_syntax", "csqa", "custom", "fv", "induction", "ioi", "lm", "math_cot"}
    for name in tasks.list_tasks():
        d = dirs.get(name)
        kwargs = {"seed": 0, **parse_task_options(opts.get(name, [])), "n_prompts": 10}
        train, val = tasks.build(name, gpt2_tok, **kwargs, **({} if d is None else {"data_dir": str(d)}))
        assert len(train) + len(val) == 10, name


def test_build_refuses_options_the_task_does_not_take(gpt2_tok):
    with pytest.raises(ValueError, match="task 'ioi' does not take bogus; it takes: .*n_prompts"):
        tasks.build("ioi", gpt2_tok, n_prompts=4, bogus=1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.build("nope", gpt2_tok)
    assert tasks.takes("fv", "data_dir") and not tasks.takes("ioi", "data_dir")

