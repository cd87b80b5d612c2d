"""Math word problems with chain of thought, in the CHG paper's format: its instruction about
step-by-step reasoning and ``\\boxed{}``, one solved example from a held-apart pool, the problem,
and the loss on the whole solution. As the paper did, only the shortest prompt-solution pairs are
kept (``keep_shortest``).

- GSM8K (offline): ``train.jsonl``/``test.jsonl`` with ``{"question", "answer"}`` in ``data_dir``
  (e.g. ``../shared/data/gsm8k``). Calculator annotations ``<<48/2=24>>`` are removed and the final
  ``#### N`` becomes ``The final answer is \\boxed{N}.``
- OpenMathInstruct-2 (online): ``data_dir="nvidia/OpenMathInstruct-2"`` (Hugging Face, needs
  ``datasets``); problems without a solution are dropped and duplicate problems removed.

Example::

    train, val = math_cot(model, dataset="gsm8k", n_prompts=256, data_dir="../shared/data/gsm8k")
"""

from __future__ import annotations

import re
from typing import Any

from ..data import TaskSplits, _tokenizer_of
from . import register
from .common import (columns, example_pool, few_shot_prompt, find_file, load_hf_dataset, load_records,
                     looks_like_hub_name, prompt_dataset, require_data_dir)

INSTRUCTION = ("For each problem, explain your reasoning step by step and use LaTeX for all mathematical "
               "expressions. Indicate your final answer using \\boxed{...}.")
"""The paper's instruction for OpenMathInstruct-2 (appendix 6.1)."""

_CALC = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def gsm8k_solution(answer: str) -> str:
    """A GSM8K answer in the paper's format: no calculator annotations, ``\\boxed{}`` final answer.

    Example::

        gsm8k_solution("48/2 = <<48/2=24>>24 clips.\\n#### 24")   # "48/2 = 24 clips.\\nThe final answer is \\\\boxed{24}."
    """
    text = _CALC.sub("", answer).strip()
    m = _FINAL.search(text)
    if not m:
        raise ValueError(f"GSM8K answer without a final '#### N' line: {answer[-80:]!r}")
    return text[: m.start()].rstrip() + f"\nThe final answer is \\boxed{{{m.group(1).replace(',', '')}}}."


def load_math(dataset: str, data_dir: Any, split: str) -> list[tuple[str, str]]:
    """(problem, solution) pairs."""
    if dataset == "gsm8k":
        if looks_like_hub_name(data_dir):
            rows = load_hf_dataset(str(data_dir), split=split, config="main")
        else:
            root = require_data_dir(data_dir, "math_cot", "pass the GSM8K folder with train.jsonl/test.jsonl "
                                    "(e.g. ../shared/data/gsm8k), or 'openai/gsm8k' online")
            rows = load_records(find_file(root, [f"{split}.jsonl"], ["", "gsm8k"], "math_cot"))
        columns(rows, ("question", "answer"), f"gsm8k {split}")
        return [(r["question"].strip(), gsm8k_solution(r["answer"])) for r in rows]
    if dataset == "openmathinstruct2":
        name = data_dir if data_dir is not None else "nvidia/OpenMathInstruct-2"
        rows = load_records(name) if not looks_like_hub_name(name) else load_hf_dataset(str(name), split=split)
        columns(rows, ("problem", "generated_solution"), str(name))
        return openmath_pairs(rows)
    raise ValueError(f"dataset must be 'gsm8k' or 'openmathinstruct2'; got {dataset!r}")


def openmath_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """OpenMathInstruct-2 records -> (problem, solution): drops records without a solution
    (empty, or ``expected_answer`` missing / "no solution") and keeps the first of duplicate problems."""
    seen, out = set(), []
    for r in rows:
        sol = str(r.get("generated_solution") or "").strip()
        ans = str(r.get("expected_answer", "x") or "").strip().lower()
        if not sol or not ans or "no solution" in ans or r["problem"] in seen:
            continue
        seen.add(r["problem"])
        out.append((str(r["problem"]).strip(), sol))
    return out


@register("math_cot", "math word problems with chain of thought (GSM8K offline, OpenMathInstruct-2 online); "
          "loss on the whole solution")
def math_cot(
    model_or_tokenizer: Any,
    dataset: str = "gsm8k",
    n_prompts: int = 256,
    seed: int = 0,
    data_dir: Any = None,
    split: str = "train",
    val_fraction: float = 0.1,
    pool_size: int = 50,
    keep_shortest: int | None = None,
    instruction: str = INSTRUCTION,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """``{instruction}\\n\\nProblem: {q}\\nSolution: {s}\\n\\nProblem: {query}\\nSolution:`` -> `` {solution}``.

    Args:
        dataset: ``"gsm8k"`` (``data_dir`` = folder with ``<split>.jsonl``) or ``"openmathinstruct2"``
            (``data_dir`` = a Hugging Face name, default ``nvidia/OpenMathInstruct-2``, or a local file).
        n_prompts: number of problems.
        seed: seeds tie order, the problems, the examples and the split.
        split: file/split to read (GSM8K ``train``/``test``; OpenMathInstruct-2 e.g. ``train_1M``).
        val_fraction: share of rows for validation.
        pool_size: held-apart solved examples, one per prompt (the paper: 50).
        keep_shortest: only the shortest this many pairs are used (default ``pool_size + n_prompts``,
            as the paper kept the shortest problems).

    Example::

        train, val = math_cot(model, n_prompts=128, data_dir="../shared/data/gsm8k")
    """
    tok = _tokenizer_of(model_or_tokenizer)
    pairs = load_math(dataset, data_dir, split)
    keep = keep_shortest if keep_shortest is not None else pool_size + n_prompts
    pool, queries, rng = example_pool(pairs, n_prompts, pool_size, seed, f"math_cot:{dataset}", keep_shortest=keep)
    prompts, targets, meta = [], [], {"problem": []}
    for x, y in queries:
        p, t = few_shot_prompt([rng.choice(pool)], x, y, instruction=instruction,
                               input_prefix="Problem: ", output_prefix="Solution:")
        prompts.append(p)
        targets.append(t)
        meta["problem"].append(x)
    data = prompt_dataset(model_or_tokenizer, prompts, targets, f"math_{dataset}", meta, prepend_bos)
    return data.split(val_fraction, seed)
