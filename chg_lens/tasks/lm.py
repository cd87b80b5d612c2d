"""Plain language modelling: windows of ``window`` tokens from a text corpus, loss on every token
(as the seed's ``--dataset wikitext`` mode). The corpus is a text file, a folder holding one
(WikiText-2: ``test.txt``/``valid.txt`` in ``../shared/data/wikitext-2``) or, online, a Hugging Face
text dataset name (``data_dir="wikitext"`` with ``hf_config="wikitext-2-raw-v1"``).

Example::

    train, val = language_modeling(model, n_prompts=128, window=64, data_dir="../shared/data/wikitext-2")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import TaskDataset, TaskSplits, _tokenizer_of
from . import register
from .common import adds_bos, context_limit, load_hf_dataset, looks_like_hub_name, require_data_dir

_WHERE = "pass a text file, a folder with test.txt/valid.txt/train.txt (e.g. ../shared/data/wikitext-2), or a Hugging Face dataset name"


def load_text(data_dir: Any, split: str = "test", hf_config: str | None = None, text_column: str = "text") -> str:
    """The corpus as one string."""
    if looks_like_hub_name(data_dir) or (isinstance(data_dir, str) and hf_config is not None):
        rows = load_hf_dataset(str(data_dir), split=split, config=hf_config)
        if rows and text_column not in rows[0]:
            raise ValueError(f"{data_dir}: no column {text_column!r}; it has {sorted(rows[0])}")
        return "".join(str(r[text_column]) for r in rows)
    path = require_data_dir(data_dir, "lm", _WHERE)
    if path.is_dir():
        found = [path / f"{split}.txt", path / f"wiki.{split}.tokens"] + sorted(path.glob("*.txt"))
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no {split}.txt or other .txt file in {data_dir}; {_WHERE}")
    return Path(path).read_text(encoding="utf-8")


@register("lm", "plain language modelling: windows of N tokens of a text corpus (WikiText), loss on every token")
def language_modeling(
    model_or_tokenizer: Any,
    n_prompts: int = 256,
    window: int = 128,
    seed: int = 0,
    data_dir: Any = None,
    split: str = "test",
    val_fraction: float = 0.2,
    hf_config: str | None = None,
    text_column: str = "text",
    max_chars: int | None = None,
    prepend_bos: bool | None = None,
) -> TaskSplits:
    """``n_prompts`` non-overlapping windows of ``window`` tokens, drawn at random (seeded) from the
    tokenized corpus; every token of the window is a target (the first one too when a BOS precedes it).

    Args:
        n_prompts: number of windows (capped, with an error, at what the corpus holds).
        window: tokens per window (BOS not counted).
        seed: seeds which windows are drawn and the split.
        data_dir: text file, folder (``{split}.txt``) or Hugging Face dataset name.
        split: which file/split (WikiText-2 here: ``test`` or ``valid``).
        hf_config / text_column: for Hugging Face datasets.
        max_chars: use only the first this many characters of the corpus (faster tokenization).
        prepend_bos: None follows the tokenizer.

    Example::

        train, val = language_modeling(tokenizer, n_prompts=64, window=32, data_dir="../shared/data/wikitext-2")
    """
    tok = _tokenizer_of(model_or_tokenizer)
    bos = prepend_bos if prepend_bos is not None else adds_bos(tok)
    limit = context_limit(model_or_tokenizer)
    if window < 2 or n_prompts < 2:
        raise ValueError("window and n_prompts must be at least 2")
    if limit is not None and window + int(bool(bos)) > limit:
        raise ValueError(f"window={window} exceeds the context of {limit} tokens; lower window")
    text = load_text(data_dir, split, hf_config, text_column)[:max_chars]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_windows = len(ids) // window
    if n_windows < n_prompts:
        raise ValueError(f"the corpus holds {n_windows} windows of {window} tokens; ask for at most that many (n_prompts)")
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_prompts]
    rows = torch.stack([ids[int(k) * window:(int(k) + 1) * window] for k in pick])
    mask = torch.ones_like(rows, dtype=torch.bool)
    if bos:
        rows = torch.cat([torch.full((n_prompts, 1), tok.bos_token_id), rows], dim=1)
        mask = torch.cat([torch.zeros((n_prompts, 1), dtype=torch.bool), mask], dim=1)
    else:
        mask[:, 0] = False  # the first token has no context
    data = TaskDataset.from_tokens(rows, mask, tok.pad_token_id if tok.pad_token_id is not None else 0, "lm")
    data.row_meta["window_start"] = [int(k) * window for k in pick]
    data.meta.update(window=window, source=str(data_dir))
    return data.split(val_fraction, seed)
