"""Record what chosen attention heads do on text windows (read-only hooks, no gradients).

For every head and query token: the norm of the head's output ``||z_h @ W_O[l, h]||`` and the
attention pattern's top source positions with their weights. ``hook_z`` and ``hook_pattern`` are
only read, never changed. The recording is streamed to ``raw_events.parquet`` (one row per window,
query position and head) with the token strings it needs in the file's metadata, so later steps
need neither the model nor its tokenizer.

Example::

    heads = select_heads(model, max_heads=20)
    record_to_parquet(model, windows, heads, "out/raw_events.parquet")
    raw = load_raw("out/raw_events.parquet")
    raw.activity.shape    # (n_heads, n_windows, window_len)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .. import models
from .sources import Windows

META_KEY = b"chg_lens.explain"


def parse_heads(spec: str | Sequence | None) -> list[tuple[int, int]] | None:
    """``"0.1,2.3"`` or ``[(0, 1), (2, 3)]`` -> list of (layer, head); None stays None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        out = []
        for item in spec.split(","):
            try:
                layer, head = item.strip().split(".")
                out.append((int(layer), int(head)))
            except ValueError as err:
                raise ValueError(f"heads are written LAYER.HEAD, comma separated (e.g. 0.1,5.3); got {item!r}") from err
        return out
    return [(int(l), int(h)) for l, h in spec]


def select_heads(model, heads: Sequence[tuple[int, int]] | None = None, max_heads: int | None = None,
                 seed: int = 0) -> list[tuple[int, int]]:
    """The heads to record: ``heads`` if given (checked), else all heads; more than ``max_heads``
    are cut to a random sample (``seed``), sorted by layer and head.

        select_heads(model, max_heads=3)   # e.g. [(0, 2), (1, 0), (1, 3)]
    """
    L, H = models.n_layers(model), models.n_heads(model)
    if heads is None:
        chosen = [(l, h) for l in range(L) for h in range(H)]
    else:
        chosen = sorted(set((int(l), int(h)) for l, h in heads))
        bad = [(l, h) for l, h in chosen if not (0 <= l < L and 0 <= h < H)]
        if bad:
            raise ValueError(f"heads {bad} do not exist: the model has {L} layers x {H} heads")
    if max_heads is not None:
        if max_heads < 1:
            raise ValueError("max_heads must be at least 1")
        if len(chosen) > max_heads:
            chosen = sorted(random.Random(seed).sample(chosen, max_heads))
    return chosen


def head_activity(
    z: Float[Tensor, "batch pos head_index d_head"], W_O: Float[Tensor, "head_index d_head d_model"]
) -> Float[Tensor, "batch pos head_index"]:
    """Norm of each head's output per query token: ``||z[..., h, :] @ W_O[h]||``."""
    return torch.einsum("bphd,hdm->bphm", z, W_O.to(z.dtype)).norm(dim=-1)


def record_batch(model, tokens: Int[Tensor, "batch pos"], heads: Sequence[tuple[int, int]], top_sources: int = 3
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass (stopped after the last layer needed) with read-only hooks.

    Returns ``activity [batch, pos, n]``, ``sources [batch, pos, n, k]`` and ``weights [batch, pos, n, k]``
    for the ``n`` heads in order.
    """
    layers = sorted({l for l, _ in heads})
    W_O = models.W_O(model)
    store: dict[tuple[str, int], Tensor] = {}

    def reader(kind: str, layer: int):
        def hook(x, hook):  # read only: returns None, so the activation is unchanged
            store[(kind, layer)] = x.detach()
        return hook

    hooks = [(models.z_hook_name(l), reader("z", l)) for l in layers]
    hooks += [(models.pattern_hook_name(l), reader("pattern", l)) for l in layers]
    with torch.no_grad():
        models.run_until_layer(model, tokens.to(models.device(model)), hooks, layers[-1])
        acts, srcs, wts = [], [], []
        for l in layers:
            idx = [h for (ll, h) in heads if ll == l]
            z = store[("z", l)][:, :, idx].float()
            acts.append(head_activity(z, W_O[l, idx].float()))
            pattern = store[("pattern", l)][:, idx].float()          # [batch, n, q, k]
            k = min(top_sources, pattern.shape[-1])
            w, s = pattern.topk(k, dim=-1)
            srcs.append(s.permute(0, 2, 1, 3))
            wts.append(w.permute(0, 2, 1, 3))
    return torch.cat(acts, 2).float().cpu(), torch.cat(srcs, 2).cpu(), torch.cat(wts, 2).float().cpu()


def record_to_parquet(
    model,
    windows: Windows,
    heads: Sequence[tuple[int, int]],
    path: str | os.PathLike,
    batch_size: int = 8,
    top_sources: int = 3,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    autocast: str | None = "auto",
) -> Path:
    """Record ``heads`` on every window and write ``raw_events.parquet`` (streamed, one row group a batch).

    Columns: window, pos, token, layer, head, activity, src0..src{k-1}, w0..w{k-1}. The file's
    metadata holds the heads, the windows' sources, the strings of the tokens that occur, ``meta``,
    and the precision of the recording passes (``autocast``, default ``"auto"``: see
    :func:`chg_lens.models.resolve_autocast`; activities and weights are stored as float32).
    """
    model = models.as_model(model)
    heads = list(heads)
    if not heads:
        raise ValueError("no heads to record")
    tok = models.tokenizer(model)
    tokens = windows.tokens
    n_ctx = models.n_ctx(model)
    if n_ctx and tokens.shape[1] > n_ctx:
        raise ValueError(f"window_len {tokens.shape[1]} is longer than the model's context ({n_ctx}); use a shorter --window-len")
    ids = sorted(set(tokens.flatten().tolist()))
    token_str = {int(i): tok.decode([i]) for i in ids}
    autocast = models.resolve_autocast(model, autocast)
    info = dict(meta or {})
    info.update(**models.precision_meta(model, autocast), heads=[list(h) for h in heads],
                sources=list(windows.source), top_sources=top_sources,
                n_windows=int(tokens.shape[0]), window_len=int(tokens.shape[1]),
                bos_token_id=getattr(tok, "bos_token_id", None),
                token_str={str(k): v for k, v in token_str.items()})
    k = top_sources
    fields = [("window", pa.int32()), ("pos", pa.int32()), ("token", pa.int32()), ("layer", pa.int16()),
              ("head", pa.int16()), ("activity", pa.float32())]
    fields += [(f"src{i}", pa.int32()) for i in range(k)] + [(f"w{i}", pa.float32()) for i in range(k)]
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(info, sort_keys=True).encode()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n_heads = len(heads)
    layer_col = np.array([l for l, _ in heads], dtype=np.int16)
    head_col = np.array([h for _, h in heads], dtype=np.int16)
    with models.frozen(model), models.cast_weights_once(model, autocast), pq.ParquetWriter(tmp, schema) as writer:
        bar = tqdm(range(0, tokens.shape[0], batch_size), desc="record heads", disable=not progress)
        for start in bar:
            batch = tokens[start:start + batch_size]
            with models.autocast(model, autocast):
                act, src, wt = record_batch(model, batch, heads, top_sources)
            b, T = batch.shape
            if src.shape[-1] < k:  # windows shorter than k: pad with position 0, weight 0
                pad = k - src.shape[-1]
                src = torch.cat([src, torch.zeros(*src.shape[:-1], pad, dtype=src.dtype)], -1)
                wt = torch.cat([wt, torch.zeros(*wt.shape[:-1], pad)], -1)
            n = b * T * n_heads
            cols = {
                "window": np.repeat(np.arange(start, start + b, dtype=np.int32), T * n_heads),
                "pos": np.tile(np.repeat(np.arange(T, dtype=np.int32), n_heads), b),
                "token": np.repeat(batch.numpy().astype(np.int32).reshape(-1), n_heads),
                "layer": np.tile(layer_col, b * T), "head": np.tile(head_col, b * T),
                "activity": act.numpy().astype(np.float32).reshape(n),
            }
            for i in range(k):
                cols[f"src{i}"] = src[..., i].numpy().astype(np.int32).reshape(n)
                cols[f"w{i}"] = wt[..., i].numpy().astype(np.float32).reshape(n)
            writer.write_table(pa.table(cols, schema=schema))
    os.replace(tmp, path)
    return path


@dataclass
class RawActivity:
    """``raw_events.parquet`` as arrays: head index ``i`` is ``heads[i]``."""

    tokens: np.ndarray            # [window, pos] int
    heads: list[tuple[int, int]]
    activity: np.ndarray          # [head, window, pos] float32
    sources: np.ndarray           # [head, window, pos, k] int
    weights: np.ndarray           # [head, window, pos, k] float32
    token_str: dict[int, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def head_index(self, layer: int, head: int) -> int:
        return self.heads.index((layer, head))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata ``record_to_parquet`` stored in the file."""
    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path} is not a raw_events.parquet written by chg_lens.explain")
    return json.loads(md[META_KEY])


def load_raw(path: str | os.PathLike) -> RawActivity:
    """Read ``raw_events.parquet`` back into arrays (exactly the values written)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run without --skip-cache first")
    meta = read_meta(path)
    table = pq.read_table(path)
    heads = [tuple(h) for h in meta["heads"]]
    W, T, k = meta["n_windows"], meta["window_len"], meta["top_sources"]
    H = len(heads)
    col = lambda name: table.column(name).to_numpy()
    window, pos = col("window"), col("pos")
    hid = {h: i for i, h in enumerate(heads)}
    # map each row's (layer, head) to its index through a lookup table
    lut = np.full((int(col("layer").max()) + 1, int(col("head").max()) + 1), -1, dtype=np.int64)
    for (l, h), i in hid.items():
        lut[l, h] = i
    row_head = lut[col("layer").astype(np.int64), col("head").astype(np.int64)]
    tokens = np.zeros((W, T), dtype=np.int64)
    tokens[window, pos] = col("token")
    activity = np.zeros((H, W, T), dtype=np.float32)
    activity[row_head, window, pos] = col("activity")
    sources = np.zeros((H, W, T, k), dtype=np.int64)
    weights = np.zeros((H, W, T, k), dtype=np.float32)
    for i in range(k):
        sources[row_head, window, pos, i] = col(f"src{i}")
        weights[row_head, window, pos, i] = col(f"w{i}")
    token_str = {int(a): b for a, b in meta.pop("token_str").items()}
    return RawActivity(tokens=tokens, heads=heads, activity=activity, sources=sources, weights=weights,
                       token_str=token_str, meta=meta)
