"""Ablation sweeps on the gate mechanism: an ablation is a gate of 0.

Zero ablation is a gate of 0 with no source; mean ablation is a gate of 0 whose source is the mean
``z`` over a reference data set (:func:`mean_z`, read by hooks that change nothing). Every sweep
scores many gate configurations per forward pass (rows of the batch = configurations x prompts)
through :func:`chg_lens.logprobs.row_logprobs`, and, where the configurations agree below some
layer, starts the pass at that layer from a residual stream computed once (prefix reuse).

Example::

    from chg_lens import ablation
    sweep = ablation.head_sweep(model, val)                    # every head zero-ablated in turn
    sweep.frame.sort_values("delta_logprob").head()            # layer, head, logprob, ..., delta_*
    sweep.tensor("delta_logprob")                              # [n_layers, n_heads]
    seq = ablation.sequential_ablation(model, val, order="backward")
    fig2 = ablation.figure2(model, val, chg_result)            # the paper's Figure 2 test
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from . import gates as gates_mod
from . import models
from .data import TaskDataset
from .logprobs import RowScores, row_logprobs
from .results import frame_from_json, frame_to_json, library_versions, load_bundle, save_bundle

METHODS = ("zero", "mean")
ORDERS = ("forward", "backward", "random")
Heads = Sequence[tuple[int, int]]


# --------------------------------------------------------------------------------------------
# Scoring many configurations: the shared engine of sweeps and patching
# --------------------------------------------------------------------------------------------


def first_changed_layer(configs: Float[Tensor, "configs layer head"], base: Float[Tensor, "layer head"]) -> Tensor:
    """Per configuration, the lowest layer whose gates differ from ``base`` (n_layers if none)."""
    diff = (configs != base.to(configs.dtype)).any(dim=2)  # [K, L]
    L = configs.shape[1]
    idx = torch.where(diff, torch.arange(L).expand_as(diff), torch.full_like(diff, L, dtype=torch.long))
    return idx.min(dim=1).values


@torch.no_grad()
def score_configs(
    model,
    data: TaskDataset,
    configs: Float[Tensor, "*configs layer head"],
    sources: Mapping[int, Tensor] | None = None,
    positions: Bool[Tensor, "rows pos"] | None = None,
    base: Float[Tensor, "layer head"] | None = None,
    answers: Any = "auto",
    prefix_reuse: bool = True,
    batch_size: int = 32,
    max_rows_per_pass: int = 256,
    progress: bool = False,
    desc: str = "configs",
    autocast: str | None = "auto",
) -> RowScores:
    """Score every row of ``data`` under each gate configuration; ``[n_configs, rows]`` on the CPU.

    ``sources`` (layer -> ``[rows, pos, head, d_head]`` per data row, or ``[head, d_head]``) and
    ``positions`` are passed to the gates (see :func:`chg_lens.gates.gate_z`). With
    ``prefix_reuse``, configurations are grouped by the lowest layer where they differ from
    ``base`` (default: all ones); the residual entering that layer is computed once per batch of
    rows under ``base`` and each group's pass starts there. ``answers``: ``"auto"`` uses
    ``data.row_meta["answers"]`` when present (their logits give the logit difference), None skips.
    ``autocast``: the precision of the passes (default ``"auto"``, see
    :func:`chg_lens.models.resolve_autocast`); under autocast the weights are cast once for the sweep.

    Example::

        scores = score_configs(model, data, gates.single_head_configs(model))
        scores.logprob_sum.mean(1)     # [n_heads_total]
    """
    model = models.as_model(model)
    data.check_model(model)
    L, H = models.n_layers(model), models.n_heads(model)
    cfg = gates_mod.as_config_gates(configs, L, H).detach().float().cpu()
    autocast = models.resolve_autocast(model, autocast)
    base = torch.ones(L, H) if base is None else base.detach().float().cpu()
    if isinstance(answers, str) and answers == "auto":
        answers = data.row_meta.get("answers")
    ans = None if answers is None else torch.as_tensor(answers, dtype=torch.long)
    if ans is not None and (ans.ndim != 2 or ans.shape[0] != len(data)):
        raise ValueError(f"answers must be [rows, n_answers] with {len(data)} rows; got {tuple(ans.shape)}")
    if positions is not None and tuple(positions.shape) != tuple(data.tokens.shape):
        raise ValueError(f"positions must be a bool mask shaped like the tokens {tuple(data.tokens.shape)}")
    K, N = cfg.shape[0], len(data)
    start = first_changed_layer(cfg, base) if prefix_reuse else torch.zeros(K, dtype=torch.long)
    start = start.clamp(max=L - 1)  # a config equal to base still needs the last block to run
    groups = {int(k): (start == k).nonzero().flatten() for k in start.unique()}
    rows_per = max(1, min(batch_size, N))
    cfg_per = max(1, max_rows_per_pass // rows_per)
    dev = models.device(model)

    lp = torch.zeros(K, N)
    ok = torch.zeros(K, N, dtype=torch.bool)
    al = None if ans is None else torch.zeros(K, N, ans.shape[1])
    chunks = [torch.arange(r, min(r + rows_per, N)) for r in range(0, N, rows_per)]
    steps = sum(len(range(0, len(g), cfg_per)) for g in groups.values()) * len(chunks)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    with models.cast_weights_once(model, autocast):  # the weights cast once for the whole sweep
        for idx in chunks:
            tokens, mask = data.tokens[idx], data.loss_mask[idx]
            width = int(mask.any(dim=0).nonzero().max()) + 1
            src = _rows_of(sources, idx, width)
            pos = None if positions is None else positions[idx, :width]
            reuse = [k for k in groups if k > 0]
            resid = {}
            if reuse:
                base_hooks = gates_mod.gate_hooks(model, base.to(dev), src, None if pos is None else pos.to(dev))
                with models.autocast(model, autocast):
                    resid = models.residuals_at(model, tokens[:, :width].to(dev), reuse, base_hooks)
            for k, members in groups.items():
                for c in range(0, len(members), cfg_per):
                    which = members[c : c + cfg_per]
                    out = row_logprobs(
                        model, tokens, mask, cfg[which].to(dev), src, pos,
                        answers=None if ans is None else ans[idx],
                        start_at_layer=k if k > 0 else None, resid=resid.get(k), autocast=autocast,
                    )
                    lp[which[:, None], idx[None, :]] = out.logprob_sum.float().cpu()
                    ok[which[:, None], idx[None, :]] = out.correct.cpu()
                    if al is not None:
                        al[which[:, None], idx[None, :]] = out.answer_logits.cpu()
                    bar.update(1)
    bar.close()
    return RowScores(lp, data.n_targets.clone(), ok, al)


def _rows_of(sources: Mapping[int, Tensor] | None, idx: Tensor, width: int) -> dict[int, Tensor] | None:
    """The part of per-row sources that belongs to rows ``idx`` (shared ``[head, d_head]`` kept)."""
    if sources is None:
        return None
    return {l: (s[idx, :width] if s.ndim == 4 else s) for l, s in sources.items()}


def metrics(scores: RowScores) -> dict[str, Tensor]:
    """Per configuration, means over rows: ``logprob`` (summed target log-prob), ``logprob_mean``
    (per target token), ``accuracy`` (all targets argmax-correct) and, with answers, ``logit_diff``."""
    out = {
        "logprob": scores.logprob_sum.mean(dim=1),
        "logprob_mean": scores.logprob_mean.mean(dim=1),
        "accuracy": scores.correct.float().mean(dim=1),
    }
    if scores.answer_logits is not None and scores.answer_logits.shape[-1] >= 2:
        out["logit_diff"] = scores.logit_diff.mean(dim=1)
    return out


# --------------------------------------------------------------------------------------------
# Mean ablation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_z(model, reference: TaskDataset, batch_size: int = 32) -> dict[int, Float[Tensor, "head d_head"]]:
    """Mean ``z`` per layer and head over every real (non-padding) position of ``reference``;
    the source of mean ablation. Read by hooks that change nothing.

    Example::

        means = mean_z(model, train)
        score_configs(model, val, configs, sources=means)      # mean ablation
    """
    model = models.as_model(model)
    reference.check_model(model)
    total: dict[int, Tensor] = {}
    count = 0
    dev = models.device(model)
    for r in range(0, len(reference), batch_size):
        idx = torch.arange(r, min(r + batch_size, len(reference)))
        width = int(reference.lengths[idx].max())
        real = (torch.arange(width)[None, :] < reference.lengths[idx, None]).to(dev)
        for l, z in models.cache_z(model, reference.tokens[idx, :width].to(dev)).items():
            total[l] = total.get(l, 0) + (z.float() * real[..., None, None]).sum(dim=(0, 1))
        count += int(real.sum())
    return {l: (t / count).cpu() for l, t in total.items()}


def _sources(model, method: str, reference: TaskDataset | None, data: TaskDataset, batch_size: int):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "zero":
        return None
    return mean_z(model, reference if reference is not None else data, batch_size)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """A long DataFrame (one row per configuration: ``layer``, ``head``, metrics, ``delta_*``), the
    baseline metrics (the unablated configuration) and metadata."""

    frame: pd.DataFrame
    baseline: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, column: str = "delta_logprob") -> Float[Tensor, "layer head"]:
        """``column`` as an ``[n_layers, n_heads]`` tensor (single-head sweeps; NaN where absent)."""
        L, H = int(self.meta["n_layers"]), int(self.meta["n_heads"])
        out = torch.full((L, H), float("nan"))
        f = self.frame
        out[torch.tensor(f["layer"].to_numpy(dtype="int64")), torch.tensor(f["head"].to_numpy(dtype="int64"))] = torch.tensor(
            f[column].to_numpy(dtype="float64"), dtype=torch.float32)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Folder with ``frame.parquet``, ``frame.csv``, ``meta.json`` (+ tensors.safetensors)."""
        tensors = {}
        if {"layer", "head"} <= set(self.frame.columns) and "step" not in self.frame.columns:
            tensors["delta_logprob"] = self.tensor("delta_logprob")
        path = save_bundle(path, tensors, {"kind": "ablation", "frame": frame_to_json(self.frame),
                                           "baseline": self.baseline, "meta": self.meta})
        self.frame.to_parquet(path / "frame.parquet", index=False)
        self.frame.to_csv(path / "frame.csv", index=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AblationResult":
        _, meta = load_bundle(path)
        if meta.get("kind") != "ablation":
            raise ValueError(f"{path} holds a '{meta.get('kind')}' result, not an ablation result")
        return cls(frame_from_json(meta["frame"]), meta["baseline"], meta["meta"])


def _meta(model, data: TaskDataset, autocast: str | None, **extra) -> dict[str, Any]:
    return {"model": models.model_name(model), "task": data.name, "n_rows": len(data),
            "n_layers": models.n_layers(model), "n_heads": models.n_heads(model),
            "data_fingerprint": data.fingerprint(), "versions": library_versions(),
            **models.precision_meta(model, autocast), **extra}


def _with_deltas(frame: pd.DataFrame, values: dict[str, Tensor], baseline: dict[str, float]) -> pd.DataFrame:
    for name, v in values.items():
        frame[name] = v.double().numpy()
    for name, v in values.items():
        frame[f"delta_{name}"] = v.double().numpy() - baseline[name]
    return frame


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def all_heads(model) -> list[tuple[int, int]]:
    return [(l, h) for l in range(models.n_layers(model)) for h in range(models.n_heads(model))]


def head_sweep(
    model,
    data: TaskDataset,
    heads: Heads | None = None,
    method: str = "zero",
    reference: TaskDataset | None = None,
    base: Float[Tensor, "layer head"] | None = None,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    max_rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "auto",
) -> AblationResult:
    """Ablate every head (or ``heads``) on its own (the "individual" mode), many heads per pass.

    ``method``: ``"zero"`` or ``"mean"`` (mean ``z`` over ``reference``, default ``data``). ``base``
    gates the other heads (default: all open). ``delta_*`` columns are ablated minus baseline.

    Example::

        sweep = head_sweep(model, val, method="mean", reference=train)
        sweep.tensor("delta_logprob")      # [n_layers, n_heads]
    """
    model = models.as_model(model)
    heads = all_heads(model) if heads is None else [(int(l), int(h)) for l, h in heads]
    _check_heads(model, heads)
    src = _sources(model, method, reference, data, batch_size)
    start = gates_mod.ones(model) if base is None else base.detach().float().cpu()
    configs = torch.cat([start[None], gates_mod.single_head_configs(model, heads, 0.0, start)])
    scores = score_configs(model, data, configs, src, base=start, autocast=autocast, prefix_reuse=prefix_reuse,
                           batch_size=batch_size, max_rows_per_pass=max_rows_per_pass, progress=progress,
                           desc="head sweep")
    values = metrics(scores)
    baseline = {k: float(v[0]) for k, v in values.items()}
    frame = pd.DataFrame({"layer": [l for l, _ in heads], "head": [h for _, h in heads]})
    frame = _with_deltas(frame, {k: v[1:] for k, v in values.items()}, baseline)
    return AblationResult(frame, baseline, _meta(model, data, autocast, mode="individual", method=method))


def head_order(model, order: str | Heads = "forward", seed: int = 0) -> list[tuple[int, int]]:
    """Heads in ``"forward"`` (layer 0 head 0 first), ``"backward"``, ``"random"`` (seeded) or a
    given order (a list of ``(layer, head)``)."""
    heads = all_heads(model)
    if isinstance(order, str):
        if order == "forward":
            return heads
        if order == "backward":
            return heads[::-1]
        if order == "random":
            random.Random(seed).shuffle(heads)
            return heads
        raise ValueError(f"order must be one of {ORDERS} or a list of (layer, head); got {order!r}")
    given = [(int(l), int(h)) for l, h in order]
    _check_heads(model, given)
    if len(set(given)) != len(given):
        raise ValueError("the given order names a head more than once")
    return given


def sequential_ablation(
    model,
    data: TaskDataset,
    order: str | Heads = "forward",
    method: str = "zero",
    reference: TaskDataset | None = None,
    base: Float[Tensor, "layer head"] | None = None,
    n_steps: int | None = None,
    seed: int = 0,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    max_rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "auto",
) -> AblationResult:
    """Cumulative ablation: step ``i`` ablates the first ``i`` heads of ``order`` (see
    :func:`head_order`); all steps share forward passes. The frame has ``step`` (1..n) and the
    ``layer``/``head`` ablated at that step.

    Example::

        seq = sequential_ablation(model, val, order="random", seed=1, n_steps=40)
        seq.frame[["step", "layer", "head", "delta_logprob"]]
    """
    model = models.as_model(model)
    heads = head_order(model, order, seed)[: n_steps]
    src = _sources(model, method, reference, data, batch_size)
    L, H = models.n_layers(model), models.n_heads(model)
    start = torch.ones(L, H) if base is None else base.detach().float().cpu()
    configs = start.repeat(len(heads) + 1, 1, 1)
    for i, (l, h) in enumerate(heads):
        configs[i + 1 :, l, h] = 0.0
    scores = score_configs(model, data, configs, src, base=start, autocast=autocast, prefix_reuse=prefix_reuse,
                           batch_size=batch_size, max_rows_per_pass=max_rows_per_pass, progress=progress,
                           desc="sequential")
    values = metrics(scores)
    baseline = {k: float(v[0]) for k, v in values.items()}
    frame = pd.DataFrame({"step": range(1, len(heads) + 1), "layer": [l for l, _ in heads],
                          "head": [h for _, h in heads]})
    frame = _with_deltas(frame, {k: v[1:] for k, v in values.items()}, baseline)
    label = order if isinstance(order, str) else "given"
    meta = _meta(model, data, autocast, mode="sequential", method=method, order=label, seed=seed)
    return AblationResult(frame, baseline, meta)


def figure2(
    model,
    data: TaskDataset,
    result,
    seeds: int | Sequence[int] | str = "each",
    scores: Sequence[str] = ("facilitation", "irrelevance", "interference"),
    n_steps: int | None = None,
    method: str = "zero",
    reference: TaskDataset | None = None,
    prefix_reuse: bool = True,
    batch_size: int = 32,
    max_rows_per_pass: int = 256,
    progress: bool = False,
    autocast: str | None = "auto",
) -> AblationResult:
    """The paper's Figure 2 test from a fitted :class:`~chg_lens.chg.CHGResult`.

    For each seed's G+ and each score, heads are sorted by that seed's score (descending) and set
    one at a time, cumulatively, to 1 ("retained") and to 0 ("ablated"), starting from G+. The
    frame has ``score, seed, step (1..n), layer, head`` (the head toggled at that step),
    ``logprob_retained, logprob_ablated, delta_logprob`` (= ablated - retained; mean over rows of
    the summed target log-prob), and the same for accuracy. The taxonomy predicts: facilitation
    falls, irrelevance stays near 0, interference rises while interfering heads remain.

    Example::

        fig = figure2(model, val, result, seeds=0, n_steps=50)
        fig.frame.groupby(["score", "step"]).delta_logprob.mean()
    """
    from .taxonomy import SCORES

    model = models.as_model(model)
    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise ValueError(f"scores must be among {SCORES}; got {bad}")
    g_plus = result.g_plus.detach().float().cpu()
    L, H = models.n_layers(model), models.n_heads(model)
    if tuple(g_plus.shape[1:]) != (L, H):
        raise ValueError(f"the CHG result is for [{g_plus.shape[1]}, {g_plus.shape[2]}] heads; the model has [{L}, {H}]")
    seed_list = list(range(g_plus.shape[0])) if seeds == "each" else ([seeds] if isinstance(seeds, int) else list(seeds))
    if any(not 0 <= s < g_plus.shape[0] for s in seed_list):
        raise ValueError(f"seeds must be in [0, {g_plus.shape[0]}); got {seed_list}")
    table = result.scores()
    src = _sources(model, method, reference, data, batch_size)
    n = L * H if n_steps is None else min(int(n_steps), L * H)
    configs, labels = [], []
    for s in seed_list:
        per_seed = table[table["seed"] == s]
        for score in scores:
            ranked = per_seed.sort_values([score, "layer", "head"], ascending=[False, True, True], kind="stable")
            heads = list(zip(ranked["layer"].astype(int), ranked["head"].astype(int)))[:n]
            kept, dropped = g_plus[s].clone(), g_plus[s].clone()
            for step, (l, h) in enumerate(heads, start=1):
                kept[l, h], dropped[l, h] = 1.0, 0.0
                configs += [kept.clone(), dropped.clone()]
                labels.append((score, s, step, l, h))
    cfg = torch.stack(configs)
    # Prefix reuse relative to each config's own G+: run the seeds separately so 'base' is that G+.
    lp = torch.zeros(cfg.shape[0])
    acc = torch.zeros(cfg.shape[0])
    per = 2 * n * len(scores)
    for i, s in enumerate(seed_list):
        part = slice(i * per, (i + 1) * per)
        sc = score_configs(model, data, cfg[part], src, base=g_plus[s], answers=None, autocast=autocast,
                           prefix_reuse=prefix_reuse, batch_size=batch_size, max_rows_per_pass=max_rows_per_pass,
                           progress=progress, desc=f"figure 2, seed {s}")
        lp[part] = sc.logprob_sum.mean(dim=1)
        acc[part] = sc.correct.float().mean(dim=1)
    frame = pd.DataFrame(labels, columns=["score", "seed", "step", "layer", "head"])
    frame["logprob_retained"] = lp[0::2].double().numpy()
    frame["logprob_ablated"] = lp[1::2].double().numpy()
    frame["delta_logprob"] = frame["logprob_ablated"] - frame["logprob_retained"]
    frame["accuracy_retained"] = acc[0::2].double().numpy()
    frame["accuracy_ablated"] = acc[1::2].double().numpy()
    frame["delta_accuracy"] = frame["accuracy_ablated"] - frame["accuracy_retained"]
    base_scores = score_configs(model, data, g_plus[seed_list], src, answers=None, autocast=autocast,
                                prefix_reuse=False, batch_size=batch_size, max_rows_per_pass=max_rows_per_pass)
    baseline = {f"g_plus_seed{s}": float(v) for s, v in zip(seed_list, base_scores.logprob_sum.mean(dim=1))}
    meta = _meta(model, data, autocast, mode="figure2", method=method, seeds=seed_list, scores=list(scores),
                 n_steps=n, chg_task=result.meta.get("task"))
    return AblationResult(frame, baseline, meta)


def _check_heads(model, heads: Heads) -> None:
    L, H = models.n_layers(model), models.n_heads(model)
    bad = [(l, h) for l, h in heads if not (0 <= l < L and 0 <= h < H)]
    if bad:
        raise ValueError(f"heads {bad[:5]} are outside the model's {L} layers x {H} heads")


# --------------------------------------------------------------------------------------------
# Command line: `chg-lens ablate`
# --------------------------------------------------------------------------------------------


def add_cli_arguments(p) -> None:
    """Arguments of ``chg-lens ablate``."""
    from .cli import add_run_options

    p.add_argument("--mode", choices=["individual", "sequential", "figure2"], default="individual",
                   help="individual: each head alone; sequential: cumulative in --order; figure2: from --chg")
    p.add_argument("--chg", default=None, help="a saved CHG result folder (figure2; its model/task are the defaults)")
    p.add_argument("--model", default=None, help="default: the CHG result's model, else smollm2-135m-instruct")
    p.add_argument("--task", default=None, help="default: the CHG result's task, else ioi")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-prompts", type=int, default=None)
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", choices=["validation", "train"], default="validation", help="rows to score")
    p.add_argument("--seed", type=int, default=0, help="task seed, and the random order's seed")
    p.add_argument("--method", choices=list(METHODS), default="zero", help="zero, or mean (mean z over the train split)")
    p.add_argument("--order", default="forward", help="forward, backward, random, or heads 'L.H,L.H,...'")
    p.add_argument("--n-steps", type=int, default=None, help="sequential/figure2: at most this many steps")
    p.add_argument("--chg-seeds", default="each", help="figure2: 'each' or seed numbers '0,2'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-rows-per-pass", type=int, default=256)
    p.add_argument("--no-prefix-reuse", action="store_true")
    add_run_options(p, out="runs/ablate")


def run_cli(a) -> int:
    """``chg-lens ablate``: writes ``frame.parquet``, ``frame.csv``, ``meta.json`` to ``--out``."""
    import time

    from .chg import CHGResult
    from .cli import build_task, parse_task_options

    t0 = time.time()
    result = None
    if a.mode == "figure2":
        if not a.chg:
            raise ValueError("--mode figure2 needs --chg, a saved CHG result folder (chg-lens fit --out DIR)")
        result = CHGResult.load(a.chg)
    meta = result.meta if result is not None else {}
    model_name = a.model or meta.get("model") or "smollm2-135m-instruct"
    task = a.task or meta.get("task") or "ioi"
    order: Any = a.order
    if a.order not in ORDERS:
        try:
            order = [tuple(int(x) for x in item.split(".")) for item in a.order.split(",")]
        except ValueError:
            raise ValueError(f"--order must be forward, backward, random or 'L.H,L.H'; got {a.order!r}") from None
    seeds: Any = "each" if a.chg_seeds == "each" else [int(s) for s in a.chg_seeds.split(",")]
    model = models.load_model(model_name, device=a.device, dtype=a.dtype)
    n_prompts = a.n_prompts if a.n_prompts is not None else (80 if task == "ioi" else None)
    train, val = build_task(model, task, n_prompts, a.seed, a.data_dir, parse_task_options(a.task_option))
    data = val if a.split == "validation" else train
    common = dict(method=a.method, reference=train, prefix_reuse=not a.no_prefix_reuse, batch_size=a.batch_size,
                  max_rows_per_pass=a.max_rows_per_pass, progress=not a.no_progress, autocast=a.autocast)
    print(f"precision: {models.describe_precision(model, a.autocast)}")
    if a.mode == "individual":
        res = head_sweep(model, data, **common)
        top = res.frame.nsmallest(5, "delta_logprob")
        lines = [f"L{int(r.layer)}H{int(r['head'])} {r.delta_logprob:+.3f}" for _, r in top.iterrows()]
        print("largest drops in target log-prob: " + ", ".join(lines))
    elif a.mode == "sequential":
        res = sequential_ablation(model, data, order=order, n_steps=a.n_steps, seed=a.seed, **common)
        print(res.frame[["step", "layer", "head", "delta_logprob"]].tail(5).to_string(index=False))
    else:
        res = figure2(model, data, result, seeds=seeds, n_steps=a.n_steps, **common)
        print(res.frame.groupby(["score", "step"]).delta_logprob.mean().unstack(0).head(10).to_string())
    res.meta.update(model=model_name, task=task, split=a.split)
    path = res.save(a.out)
    print(f"wrote {path}/ (frame.parquet, frame.csv, meta.json) in {time.time() - t0:.0f}s")
    return 0
