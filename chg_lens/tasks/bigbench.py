"""BIG-bench "syntax" tasks as the CHG paper used them: the five linguistic_mappings subtasks
(past tense, plural, pronoun replacement, question formation, sentence negation), tense and
subject-verb agreement, each with the paper's instruction, one solved example from the same
subtask's held-apart pool of 10, loss on the answer.

Data: the BIG-bench task folders (``linguistic_mappings``, ``tense``, ``subject_verb_agreement``) in
``data_dir`` (e.g. ``../shared/data/bigbench``). Multiple-choice records (``target_scores``) use the
highest-scoring choice as the target.

Example::

    train, val = bigbench_syntax(model, subtask="all", data_dir="../shared/data/bigbench")
"""

from __future__ import annotations

import functools
from typing import Any

from ..data import TaskSplits, _tokenizer_of
from . import register
from .common import _missing, example_pool, few_shot_prompt, load_located_records, prompt_dataset, require_data_dir

INSTRUCTIONS = {
    "past_tense": "Convert the verb to its past tense form.",
    "plural": "Convert the noun to its plural form.",
    "pronoun_replacement": "Replace the repeated name with the correct pronoun.",
    "question_formation": "Convert the statement into a yes/no question.",
    "sentence_negation": "Convert the statement into a negative sentence.",
    "tense": "Modify the tense of a given sentence.",
    "subject_verb_agreement": "Choose the grammatically correct verb form that agrees with the subject of the sentence.",
}
"""The paper's instruction for each subtask (appendix 6.1)."""

SUBTASKS = tuple(INSTRUCTIONS)
_FILES = {
    "past_tense": ["linguistic_mappings/past_tense_json/task.json"],
    "plural": ["linguistic_mappings/plural_json/task.json"],
    "pronoun_replacement": ["linguistic_mappings/pronoun_replacement_json/task.json"],
    "question_formation": ["linguistic_mappings/question_formation_json/task.json"],
    "sentence_negation": ["linguistic_mappings/sentence_negation_json/task.json"],
    "tense": ["tense/task.json"],
}
_WHERE = "pass the BIG-bench folder holding linguistic_mappings/, tense/ and subject_verb_agreement/ (e.g. ../shared/data/bigbench)"


def _target(record: dict, source: str) -> str:
    if "target" in record:
        t = record["target"]
        return str(t[0] if isinstance(t, list) else t)
    if "target_scores" in record:
        scores = record["target_scores"]
        return str(max(scores, key=lambda k: scores[k]))
    raise ValueError(f"{source}: a record without 'target' or 'target_scores'; has {sorted(record)}")


def load_subtask(subtask: str, data_dir: Any) -> list[tuple[str, str]]:
    """(input, target) pairs of one subtask, with the inputs and targets stripped of outer spaces.

    Example::

        load_subtask("plural", "../shared/data/bigbench")[0]     # ("ability", "abilities")
    """
    if subtask not in INSTRUCTIONS:
        raise ValueError(f"unknown BIG-bench syntax subtask {subtask!r}; choose from {', '.join(SUBTASKS)} or 'all'")
    root = require_data_dir(data_dir, "bigbench_syntax", _WHERE)
    if subtask == "subject_verb_agreement":
        files = sorted(p for p in (root / "subject_verb_agreement").glob("*.json") if not p.stem.endswith("_mini"))
    else:
        files = [root / f for f in _FILES[subtask]]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"BIG-bench subtask {subtask!r}: no task file under {root}; {_WHERE}")
    return list(_read_pairs(tuple((str(f), f.stat().st_mtime_ns) for f in files)))


@functools.lru_cache(maxsize=16)
def _read_pairs(files: tuple[tuple[str, int], ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for f, _ in files:
        for where, r in load_located_records(f):
            if "input" not in r:
                raise ValueError(f"{f}, {where}: a record without 'input'; has {sorted(r)}")
            pair = (str(r["input"]).strip(), _target(r, f"{f}, {where}").strip())
            for name, value in zip(("input", "target"), (r["input"], pair[1])):
                why = _missing(value)
                if why:
                    raise ValueError(f"{f}, {where}: {why} {name}; fix or remove that record")
            pairs.append(pair)
    return tuple(dict.fromkeys(pairs))  # drop exact duplicates, keep order


@register("bigbench_syntax", "BIG-bench syntax (linguistic mappings, tense, subject-verb agreement): "
          "--task-option subtask=all|past_tense|plural|...")
def bigbench_syntax(
    model_or_tokenizer: Any,
    subtask: str = "all",
    n_prompts: int = 256,
    seed: int = 0,
    data_dir: Any = None,
    val_fraction: float = 0.1,
    pool_size: int = 10,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """Instruction, one solved example from the same subtask, the query; loss on the answer.

    Prompt: ``{instruction}\\n\\nInput: {x}\\nOutput: {y}\\n\\nInput: {query}\\nOutput:``.

    Args:
        subtask: one of :data:`SUBTASKS`, or ``"all"`` (``n_prompts`` shared evenly among them).
        n_prompts: number of rows (per subtask capped at what is left after its pool).
        seed: seeds pools' tie order, queries, examples and the split.
        data_dir: the BIG-bench folder.
        val_fraction: share of rows for validation (the paper: 90/10).
        pool_size: held-apart examples per subtask (the paper: 10).

    Example::

        train, val = bigbench_syntax(model, "plural", n_prompts=128, data_dir="../shared/data/bigbench")
    """
    tok = _tokenizer_of(model_or_tokenizer)
    names = list(SUBTASKS) if subtask == "all" else [subtask]
    if n_prompts < 2 * len(names):
        raise ValueError(f"n_prompts must be at least {2 * len(names)} for subtask={subtask!r}")
    prompts, targets, meta = [], [], {"subtask": [], "answer": []}
    for k, name in enumerate(names):
        share = n_prompts // len(names) + (1 if k < n_prompts % len(names) else 0)
        pool, queries, rng = example_pool(load_subtask(name, data_dir), share, pool_size, seed + 7919 * k,
                                          f"bigbench:{name}")
        for x, y in queries:
            p, t = few_shot_prompt([rng.choice(pool)], x, y, instruction=INSTRUCTIONS[name],
                                   input_prefix="Input: ", output_prefix="Output:")
            prompts.append(p)
            targets.append(t)
            meta["subtask"].append(name)
            meta["answer"].append(y)
    data = prompt_dataset(model_or_tokenizer, prompts, targets, f"bigbench_{subtask}", meta, prepend_bos)
    return data.split(val_fraction, seed)
