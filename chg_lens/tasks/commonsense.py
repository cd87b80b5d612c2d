"""CommonsenseQA (Talmor et al. 2019) as the CHG paper used it: multiple choice, the options
shuffled and relabelled A-E, one solved example from a held-apart pool of 10 in each prompt, the
target is the letter of the right option (" C").

Data: ``commonsense_qa.json`` from the function-vector files (``input`` = question with options
``a: ...`` .. ``e: ...``, ``output`` = letter), found in ``data_dir`` or its ``abstractive``
subfolder; or, with internet, the Hugging Face dataset ``"tau/commonsense_qa"`` as ``data_dir``.

Example::

    train, val = commonsense_qa(model, data_dir="../shared/data/function_vectors")
"""

from __future__ import annotations

import functools
import re
from typing import Any

from ..data import TaskSplits, _tokenizer_of
from . import register
from .common import (columns, example_pool, few_shot_prompt, find_file, load_hf_dataset, load_records,
                     looks_like_hub_name, prompt_dataset, require_data_dir)

LETTERS = "ABCDE"
_OPTION = re.compile(r"^([a-e]):\s?(.*)$")
_WHERE = ("pass the folder holding commonsense_qa.json (e.g. ../shared/data/function_vectors), the file itself, "
          "or the Hugging Face dataset name 'tau/commonsense_qa' (needs internet and `datasets`)")


def parse_fv_record(record: dict) -> tuple[str, list[str], int]:
    """(question, options, index of the right option) from a function-vector CommonsenseQA record."""
    question, options = [], []
    for line in str(record["input"]).split("\n"):
        m = _OPTION.match(line.strip())
        if m and (options or question):
            options.append(m.group(2).strip())
        elif not options:
            question.append(line)
    answer = "abcde".index(str(record["output"]).strip().lower())
    if len(options) < 2 or answer >= len(options):
        raise ValueError(f"cannot read the options of CommonsenseQA record {record!r}")
    return "\n".join(question).strip(), options, answer


def load_csqa(data_dir: Any, hf_split: str = "train") -> list[tuple[str, list[str], int]]:
    """(question, options, answer index) records from a file/folder or the Hugging Face hub."""
    if looks_like_hub_name(data_dir):
        rows = load_hf_dataset(str(data_dir), split=hf_split)
        columns(rows, ("question", "choices", "answerKey"), str(data_dir))
        return [(r["question"], list(r["choices"]["text"]), list(r["choices"]["label"]).index(r["answerKey"]))
                for r in rows if r["answerKey"]]
    root = require_data_dir(data_dir, "csqa", _WHERE)
    path = find_file(root, ["commonsense_qa.json"], ["", "abstractive", "function_vectors/abstractive"], "csqa")
    st = path.stat()
    return list(_parse_file(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=4)
def _parse_file(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, list[str], int], ...]:
    records = load_records(path)
    columns(records, ("input", "output"), path)
    return tuple(parse_fv_record(r) for r in records)


def _render(question: str, options: list[str], order: list[int]) -> str:
    """The question and its options in ``order``, labelled ``A. ``, ``B. ``, ..."""
    return "\n".join([question] + [f"{LETTERS[k]}. {options[j]}" for k, j in enumerate(order)])


@register("csqa", "CommonsenseQA: options shuffled and relabelled A-E, one solved example; target = the letter")
def commonsense_qa(
    model_or_tokenizer: Any,
    n_prompts: int = 256,
    seed: int = 0,
    data_dir: Any = None,
    val_fraction: float = 0.1,
    pool_size: int = 10,
    n_examples: int = 1,
    instruction: str | None = None,
    hf_split: str = "train",
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """CommonsenseQA prompts ``Question: ...\\nA. ..\\n...\\nAnswer: C``; loss on the letter.

    Args:
        n_prompts: number of questions (capped at the records left after the pool).
        seed: seeds the pool's tie order, the questions, option shuffles, examples and the split.
        data_dir: folder or file with ``commonsense_qa.json``, or ``"tau/commonsense_qa"`` online.
        val_fraction: share of rows for validation (the paper: 90/10).
        pool_size: held-apart solved examples (the paper: 10); ``n_examples`` of them per prompt.
        instruction: optional text placed before the examples.
        hf_split: split of the Hugging Face dataset when ``data_dir`` is a hub name.

    Example::

        train, val = commonsense_qa(model, n_prompts=256, data_dir="../shared/data/function_vectors")
    """
    tok = _tokenizer_of(model_or_tokenizer)
    records = load_csqa(data_dir, hf_split)
    keyed = {q: (q, o, a) for q, o, a in records}
    pool, queries, rng = example_pool([(q, o[a]) for q, o, a in keyed.values()], n_prompts, pool_size, seed, "csqa")

    def shuffled(q):
        question, options, answer = keyed[q]
        order = list(range(len(options)))
        rng.shuffle(order)
        return _render(question, options, order), LETTERS[order.index(answer)]

    prompts, targets, meta = [], [], {"answer": [], "question": []}
    for q, _ in queries:
        x, y = shuffled(q)
        shots = [shuffled(e) for e, _ in rng.sample(pool, n_examples)]
        p, t = few_shot_prompt(shots, x, y, instruction=instruction, input_prefix="Question: ", output_prefix="Answer:")
        prompts.append(p)
        targets.append(t)
        meta["answer"].append(y)
        meta["question"].append(q)
    data = prompt_dataset(model_or_tokenizer, prompts, targets, "csqa", meta, prepend_bos)
    letter_ids = [tok(" " + L, add_special_tokens=False)["input_ids"][-1] for L in LETTERS]
    data.row_meta["answers"] = [[letter_ids[LETTERS.index(a)]] + [i for L, i in zip(LETTERS, letter_ids) if L != a]
                                for a in data.row_meta["answer"]]
    return data.split(val_fraction, seed)
