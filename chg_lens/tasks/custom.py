"""Your own data: prompt/target records from a local JSON/JSONL/CSV/TSV/parquet file or a Hugging
Face dataset, optionally formatted few-shot with examples from a held-apart pool (the same
:func:`~chg_lens.tasks.common.few_shot_prompt` format as the paper's tasks). For lists already in
memory use :meth:`chg_lens.data.TaskDataset.from_prompts`.

Example::

    train, val = from_file(model, "pairs.jsonl", input_column="question", target_column="answer", n_shots=3)
"""

from __future__ import annotations

from typing import Any

from ..data import TaskSplits, _tokenizer_of
from . import register
from .common import (example_pool, few_shot_prompt, load_hf_dataset, load_located_records, looks_like_hub_name,
                     prompt_dataset, require_data_dir, text_columns)


def load_pairs(source: Any, input_column: str, target_column: str, hf_split: str = "train",
               hf_config: str | None = None, drop_empty: bool = False) -> list[tuple[str, str]]:
    """(input, target) string pairs from a file or a Hugging Face dataset name. A missing or empty
    input or target is an error naming the file, line and column (``drop_empty``: dropped, counted)."""
    if looks_like_hub_name(source):
        records = load_hf_dataset(str(source), split=hf_split, config=hf_config)
        located, name = [(f"record {i + 1}", r) for i, r in enumerate(records)], str(source)
    else:
        path = require_data_dir(source, "custom", "pass a .json/.jsonl/.csv/.tsv/.parquet file or a Hugging Face dataset name")
        if path.is_dir():
            raise ValueError(f"{path} is a folder; pass the data file itself")
        located, name = load_located_records(path), str(path)
    return text_columns(located, (input_column, target_column), name, drop_empty)


@register("custom", "your own prompt/target file (JSON/JSONL/CSV/TSV/parquet) or HF dataset: --data-dir FILE "
          "--task-option input_column=... --task-option target_column=...")
def from_file(
    model_or_tokenizer: Any,
    data_dir: Any = None,
    input_column: str = "input",
    target_column: str = "output",
    n_prompts: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    n_shots: int = 0,
    pool_size: int | None = None,
    instruction: str | None = None,
    input_prefix: str = "Q: ",
    output_prefix: str = "A:",
    target_sep: str = " ",
    hf_split: str = "train",
    hf_config: str | None = None,
    prepend_bos: bool | None = None,
    drop_empty: bool = False,
) -> TaskSplits:
    """Rows from a data file; loss on the target tokens.

    With ``n_shots=0`` (default) and no instruction, a row is ``input`` followed by
    ``target_sep + target`` exactly as given. With ``n_shots > 0`` or an ``instruction``, rows use the
    few-shot format (``{input_prefix}x\\n{output_prefix} y`` examples from a held-apart pool of
    ``pool_size`` records, default ``max(10, n_shots)``).

    Args:
        data_dir: the data file (CLI ``--data-dir``), or a Hugging Face dataset name.
        input_column / target_column: the columns holding prompt and target.
        n_prompts: rows to use (default: all; sampled with ``seed`` when fewer).
        seed: seeds sampling, examples and the split.
        n_shots: solved examples per prompt.
        drop_empty: drop rows whose input or target is missing or empty (with a warning that counts
            them) instead of raising an error that names the first.

    Example::

        train, val = from_file(tokenizer, "capitals.csv", "country", "capital", n_shots=5)
    """
    tok = _tokenizer_of(model_or_tokenizer)
    pairs = load_pairs(data_dir, input_column, target_column, hf_split, hf_config, drop_empty)
    if n_shots == 0 and instruction is None:
        import random

        idx = list(range(len(pairs)))
        if n_prompts is not None and n_prompts < len(pairs):
            idx = sorted(random.Random(seed).sample(idx, n_prompts))
        prompts, targets = [pairs[i][0] for i in idx], [target_sep + pairs[i][1] for i in idx]
    else:
        pool_n = pool_size if pool_size is not None else max(10, n_shots)
        if n_shots > pool_n:
            raise ValueError(f"n_shots={n_shots} exceeds pool_size={pool_n}")
        pool, queries, rng = example_pool(pairs, n_prompts if n_prompts is not None else len(pairs),
                                          pool_n, seed, "custom")
        prompts, targets = [], []
        for x, y in queries:
            p, t = few_shot_prompt(rng.sample(pool, n_shots), x, y, instruction=instruction, input_prefix=input_prefix,
                                   output_prefix=output_prefix, answer_sep=target_sep)
            prompts.append(p)
            targets.append(t)
    if len(prompts) < 2:
        raise ValueError(f"{data_dir}: need at least 2 rows (train and validation); got {len(prompts)}")
    return prompt_dataset(model_or_tokenizer, prompts, targets, "custom", None, prepend_bos).split(val_fraction, seed)
