"""Text windows for head explanations: WikiText, StackExchange dumps, local files, Hugging Face datasets.

A *source* is one of

- ``"wikitext"``: the WikiText corpus; from ``wikitext_dir`` (a folder of ``.txt`` files such as the
  offline ``shared/data/wikitext-2``) when given, else Hugging Face ``wikitext`` through ``datasets``
  (online users);
- ``"stackexchange"``: a folder written by EleutherAI's stackexchange-dataset tool (as the Head-explain
  seed prepares it): ``.zip`` archives of one text file per question (``--out_format zip``), folders of
  ``.txt`` files, or ``.jsonl`` / ``.jsonl.zst`` (lm_dataformat) files with a ``text`` field;
- ``"hf:NAME[:CONFIG[:SPLIT]]"``: any Hugging Face dataset with a text column (online users);
- any other string: a local file or folder of ``.txt`` / ``.jsonl`` / ``.json`` / ``.zip`` files.

Example::

    windows = sample_windows(model, ["wikitext", "notes.txt"], n_windows=200, window_len=128,
                             wikitext_dir="../shared/data/wikitext-2")
    windows.tokens.shape   # (200, 128); each window starts with the BOS token when the tokenizer has one
"""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.zst")


@dataclass
class Windows:
    """Token windows of equal length and the source each came from."""

    tokens: Int[Tensor, "window pos"]
    source: list[str]


def parse_sources(sources: str | Sequence[str]) -> list[str]:
    """``"wikitext,stackexchange"`` or a list -> list of source names (empty names dropped)."""
    items = sources.split(",") if isinstance(sources, str) else list(sources)
    out = [s.strip() for s in items if s and s.strip()]
    if not out:
        raise ValueError("no text source given: use e.g. --sources wikitext (or a local .txt/.jsonl path)")
    return out


def check_sources(sources: Sequence[str], stackexchange_dir: str | None = None,
                  wikitext_dir: str | None = None) -> None:
    """Raise a clear ValueError for a source that cannot be read, before any long work starts."""
    for src in sources:
        if src == "stackexchange":
            if not stackexchange_dir:
                raise ValueError("the 'stackexchange' source needs --stackexchange-dir (the folder written by "
                                 "EleutherAI's stackexchange-dataset tool)")
            if not Path(stackexchange_dir).is_dir():
                raise ValueError(f"--stackexchange-dir {stackexchange_dir} is not a folder")
        elif src == "wikitext":
            if wikitext_dir and not Path(wikitext_dir).exists():
                raise ValueError(f"wikitext folder {wikitext_dir} does not exist")
        elif src.startswith("hf:"):
            if len(src) <= 3:
                raise ValueError("a Hugging Face source is written hf:NAME[:CONFIG[:SPLIT]]")
        elif not Path(src).exists():
            raise ValueError(f"unknown source {src!r}: use wikitext, stackexchange, hf:NAME[:CONFIG[:SPLIT]] or "
                             "the path of a local .txt/.jsonl file or folder")


def iter_documents(source: str, stackexchange_dir: str | None = None,
                   wikitext_dir: str | None = None) -> Iterator[str]:
    """Yield the documents (strings) of one source, lazily."""
    if source == "wikitext":
        if wikitext_dir:
            yield from _local_documents(Path(wikitext_dir))
        else:
            yield from _hf_documents("wikitext", "wikitext-103-raw-v1", "train", group_lines=True)
    elif source == "stackexchange":
        yield from _local_documents(Path(stackexchange_dir or ""))
    elif source.startswith("hf:"):
        parts = source[3:].split(":")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        yield from _hf_documents(name, config, split, group_lines=name == "wikitext")
    else:
        yield from _local_documents(Path(source))


def sample_windows(
    model_or_tokenizer: Any,
    sources: str | Sequence[str],
    n_windows: int = 1500,
    window_len: int = 192,
    seed: int = 0,
    stackexchange_dir: str | None = None,
    wikitext_dir: str | None = None,
    prepend_bos: bool = True,
    oversample: int = 4,
) -> Windows:
    """Sample ``n_windows`` windows of ``window_len`` tokens, split evenly over ``sources``.

    Each source's documents are tokenized and joined (with a blank line between them) until there
    are ``oversample`` times as many non-overlapping windows as that source needs; the windows are
    then drawn at random (``seed``) and shuffled together. With ``prepend_bos`` and a tokenizer
    that has a BOS token, each window is BOS + ``window_len - 1`` text tokens.

        windows = sample_windows(tokenizer, "wikitext", 100, 64, wikitext_dir="../shared/data/wikitext-2")
    """
    names = parse_sources(sources)
    if n_windows < 2:
        raise ValueError("n_windows must be at least 2 (windows are split into explained and held-out ones)")
    if window_len < 4:
        raise ValueError("window_len must be at least 4 tokens")
    check_sources(names, stackexchange_dir, wikitext_dir)
    tok = getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer
    bos = getattr(tok, "bos_token_id", None) if prepend_bos else None
    body = window_len - (1 if bos is not None else 0)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    counts = [n_windows // len(names) + (1 if i < n_windows % len(names) else 0) for i in range(len(names))]
    rows: list[list[int]] = []
    labels: list[str] = []
    for name, count in zip(names, counts):
        chunks = _chunks(tok, iter_documents(name, stackexchange_dir, wikitext_dir), body, count * oversample, sep)
        if len(chunks) < count:
            raise ValueError(f"source {name!r} has text for only {len(chunks)} windows of {window_len} tokens; "
                             f"{count} are needed: use fewer --windows, a shorter --window-len, or more text")
        for chunk in rng.sample(chunks, count):
            rows.append(([bos] if bos is not None else []) + chunk)
            labels.append(name)
    order = list(range(len(rows)))
    rng.shuffle(order)
    tokens = torch.tensor([rows[i] for i in order], dtype=torch.long)
    return Windows(tokens=tokens, source=[labels[i] for i in order])


def _chunks(tok, docs: Iterator[str], body: int, wanted: int, sep: list[int]) -> list[list[int]]:
    buffer: list[int] = []
    chunks: list[list[int]] = []
    for doc in docs:
        if not doc.strip():
            continue
        buffer.extend(tok(doc, add_special_tokens=False)["input_ids"])
        buffer.extend(sep)
        while len(buffer) >= body:
            chunks.append(buffer[:body])
            buffer = buffer[body:]
        if len(chunks) >= wanted:
            break
    return chunks


# ----------------------------------------------------------------------------- readers
def _local_documents(path: Path) -> Iterator[str]:
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        name = f.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(f) as zf:
                for member in sorted(zf.namelist()):
                    if member.endswith("/"):
                        continue
                    data = zf.read(member)
                    yield from _documents_from_bytes(member.lower(), data)
        elif name.endswith(TEXT_SUFFIXES) or name.endswith(JSON_SUFFIXES):
            yield from _documents_from_bytes(name, f.read_bytes())


def _documents_from_bytes(name: str, data: bytes) -> Iterator[str]:
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise ImportError("reading .jsonl.zst (lm_dataformat) files needs `pip install zstandard`") from err
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        name = name[:-4]
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".jsonl"):
        for line in text.splitlines():
            if line.strip():
                doc = _text_field(json.loads(line))
                if doc:
                    yield doc
    elif name.endswith(".json"):
        obj = json.loads(text)
        for item in obj if isinstance(obj, list) else [obj]:
            doc = _text_field(item)
            if doc:
                yield doc
    else:
        yield from _paragraph_groups(text)


def _paragraph_groups(text: str, size: int = 4000) -> Iterator[str]:
    """A long text file in pieces of about ``size`` characters, cut at blank lines (so a big corpus
    file is tokenized only as far as the windows need)."""
    group: list[str] = []
    length = 0
    for para in re.split(r"\n[ \t]*\n", text):
        group.append(para)
        length += len(para) + 2
        if length >= size:
            yield "\n\n".join(group)
            group, length = [], 0
    if group:
        yield "\n\n".join(group)


def _text_field(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("text", "content", "body", "question"):
            if isinstance(obj.get(key), str):
                return obj[key]
        for value in obj.values():
            if isinstance(value, str):
                return value
    return None


def _hf_documents(name: str, config: str | None, split: str, group_lines: bool) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Hugging Face sources need `pip install datasets` (or pass a local folder)") from err
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # network or name errors: say what to do
        raise ValueError(f"could not load the Hugging Face dataset {name!r} ({type(err).__name__}: {err}); "
                         "offline, pass a local copy (e.g. --wikitext-dir ../shared/data/wikitext-2)") from err
    lines: list[str] = []
    for row in ds:
        text = _text_field(row)
        if text is None:
            continue
        if not group_lines:
            yield text
            continue
        lines.append(text)
        if sum(len(x) for x in lines) > 4000:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)
