"""Compare ways of finding the heads that matter: CHG, attribution patching, activation patching,
single-head ablation and random orders, on the same data, each timed, all scored by one
faithfulness call, with how far their head scores agree.

:func:`compare_methods` runs each method on ``data`` (with ``corrupted``, its row-by-row corrupted
twins, for the pair methods), times it (wall seconds, ``time.perf_counter``), turns every method's
result into head scores (:func:`chg_lens.faithfulness.head_scores`: CHG's mean facilitation over
seeds, ``|effect|`` of patching and attribution, ``|delta|`` of an ablation sweep), scores all the
rankings in one :func:`chg_lens.faithfulness.faithfulness` call on ``validation`` (held-out rows),
and measures agreement between every pair of methods (Spearman over heads of the head scores, and
the overlap of their top-k heads). The :class:`ComparisonResult` saves as one folder.

Example::

    clean, corrupted = chg_lens.tasks.ioi_pairs(model, n_prompts=80)
    train, held = split_pairs(clean, corrupted)                 # see :func:`split_pairs`
    cmp = compare_methods(model, train.clean, corrupted=train.corrupted, validation=held.clean,
                          fit_options=dict(n_seeds=2, updates=50, reg_updates=250))
    print(cmp.summary())       # method, seconds, cpr, cmd, spearman_vs_patching, top10_vs_patching
    cmp.save("runs/compare")   # chg_lens.load("runs/compare") is exact
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from . import checks, models
from .data import TaskDataset
from .results import Bundle, Result, frame_from_json, frame_to_json, library_versions, load_parts, require

METHODS = ("chg", "attribution", "patching", "ablation", "random")
"""Every method :func:`compare_methods` runs, in the default order."""
NEEDS_PAIRS = ("patching",)
"""Methods that need corrupted twins of the rows (``corrupted=``)."""
ABLATIONS = ("zero", "mean")
"""What the heads left out are set to in the faithfulness curves, besides a corrupted :class:`TaskDataset`."""
FAITHFULNESS = "faithfulness"
"""The sub-folder of a saved comparison that holds its :class:`~chg_lens.faithfulness.FaithfulnessResult`."""


# --------------------------------------------------------------------------------------------
# Agreement between head scores
# --------------------------------------------------------------------------------------------


def top_heads(scores: Float[Tensor, "layer head"], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the highest scores, highest first; ties broken by (layer, head) order
    (as the faithfulness curves break them), NaN last.

    Example: ``top_heads(torch.tensor([[0.1, 0.9], [0.5, 0.9]]), 2) == [(0, 1), (1, 1)]``.
    """
    flat = scores.detach().double().flatten().nan_to_num(nan=-math.inf)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


def spearman(a: Float[Tensor, "layer head"], b: Float[Tensor, "layer head"]) -> float:
    """Spearman rank correlation over heads of two ``[n_layers, n_heads]`` score tensors (heads
    that are NaN in either are left out; NaN when fewer than 3 heads remain or one side is constant)."""
    from scipy import stats

    x, y = a.detach().double().flatten(), b.detach().double().flatten()
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep].numpy(), y[keep].numpy()
    if len(x) < 3 or x.min() == x.max() or y.min() == y.max():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(x, y)[0])


def top_k_overlap(a: Float[Tensor, "layer head"], b: Float[Tensor, "layer head"], k: int = 10) -> float:
    """``|top_k(a) & top_k(b)| / k``: the share of the ``k`` highest-scoring heads two methods share
    (``k`` is capped at the number of heads)."""
    k = min(int(k), a.numel())
    return len(set(top_heads(a, k)) & set(top_heads(b, k))) / k


def agreement_frame(scores: Mapping[str, Tensor], k: int = 10) -> pd.DataFrame:
    """One row per pair of methods (in the order given): ``method_a, method_b, spearman,
    top_k_overlap`` (see :func:`spearman`, :func:`top_k_overlap`).

    Example: ``agreement_frame({"patching": p.effects.abs(), "attribution": a.effects.abs()})``.
    """
    names = list(scores)
    rows = [{"method_a": a, "method_b": b, "spearman": spearman(scores[a], scores[b]),
             "top_k_overlap": top_k_overlap(scores[a], scores[b], k)}
            for i, a in enumerate(names) for b in names[i + 1:]]
    return pd.DataFrame(rows, columns=["method_a", "method_b", "spearman", "top_k_overlap"])


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class ComparisonResult(Result):
    """Every method's result, the faithfulness curves of their rankings, wall time per method and
    the agreement between methods.

    ``results``: method -> its result (a ``CHGResult``, ``AttributionResult``, ``PatchResult`` or
    ``AblationResult``; "random" has none). ``faithfulness``: the
    :class:`~chg_lens.faithfulness.FaithfulnessResult` of all rankings. ``scores``: method -> the
    ``[n_layers, n_heads]`` head scores its ranking sorts (not for "random"). ``seconds``: method ->
    wall seconds. ``agreement``: :func:`agreement_frame`. :meth:`table` (also ``to_frame()``) is the
    summary: ``method, seconds, cpr, cmd`` and, when patching ran, ``spearman_vs_patching`` and
    ``top<k>_vs_patching``. ``save(folder)`` writes each method's result in a sub-folder, the
    faithfulness result in ``faithfulness/``, ``comparison.csv``, ``comparison.json``,
    ``agreement.csv`` and ``faithfulness.html`` (the figure); ``ComparisonResult.load`` (or
    ``chg_lens.load``) is exact.

    Example::

        cmp.table()                       # one row per method
        cmp.agreement_matrix("spearman")  # methods x methods
        cmp.tensor("attribution")         # that method's head scores, [n_layers, n_heads]
    """

    kind = "comparison"
    noun = "a comparison result"
    results: dict[str, Result]
    faithfulness: Any
    scores: dict[str, Float[Tensor, "layer head"]]
    seconds: dict[str, float]
    agreement: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods compared, in order."""
        return list(self.meta["methods"])

    @property
    def top_k(self) -> int:
        return int(self.meta.get("top_k", 10))

    def table(self) -> pd.DataFrame:
        """One row per method: ``method, seconds`` (wall time to get its ranking), ``cpr``, ``cmd``
        (areas under the faithfulness curve, :meth:`FaithfulnessResult.cpr` / ``cmd``) and, when
        patching ran, ``spearman_vs_patching`` and ``top<k>_vs_patching`` (NaN for random)."""
        cpr, cmd = self.faithfulness.cpr(), self.faithfulness.cmd()
        frame = pd.DataFrame({"method": self.methods,
                              "seconds": [float(self.seconds[m]) for m in self.methods],
                              "cpr": [float(cpr[m]) for m in self.methods],
                              "cmd": [float(cmd[m]) for m in self.methods]})
        if "patching" in self.methods:
            for col, name in (("spearman", "spearman_vs_patching"), ("top_k_overlap", f"top{self.top_k}_vs_patching")):
                matrix = self.agreement_matrix(col)
                frame[name] = [float(matrix.loc[m, "patching"]) if m in matrix.index else float("nan")
                               for m in self.methods]
        return frame

    def to_frame(self) -> pd.DataFrame:
        return self.table()

    def agreement_matrix(self, column: str = "spearman") -> pd.DataFrame:
        """``column`` of :attr:`agreement` (``"spearman"`` or ``"top_k_overlap"``) as a symmetric
        methods x methods frame, 1 on the diagonal; methods without head scores (random) left out."""
        if column not in ("spearman", "top_k_overlap"):
            raise ValueError(f"column must be 'spearman' or 'top_k_overlap'; got {column!r}")
        names = [m for m in self.methods if m in self.scores]
        out = pd.DataFrame(float("nan"), index=names, columns=names)
        for m in names:
            out.loc[m, m] = 1.0
        for r in self.agreement.itertuples(index=False):
            out.loc[r.method_a, r.method_b] = out.loc[r.method_b, r.method_a] = float(getattr(r, column))
        return out

    def tensor(self, column: str) -> Float[Tensor, "layer head"]:
        """The head scores of method ``column`` (what its ranking sorts), ``[n_layers, n_heads]``."""
        if column not in self.scores:
            raise ValueError(f"no head scores for {column!r}; methods with scores: {', '.join(self.scores)}")
        return self.scores[column]

    def summary(self) -> str:
        """The table as text, with the model, task, data sizes, metric and ablation above it."""
        m = self.meta
        lines = [f"comparison on {m.get('model')} / {m.get('task')}: {m.get('n_rows')} rows"
                 + (f" (corrupted: {m['corruption']})" if m.get("corruption") else "")
                 + f", faithfulness on {m.get('n_validation')} rows, metric {m.get('metric')}, "
                 f"heads left out: {m.get('ablation')} ablation",
                 self.table().to_string(index=False, float_format=lambda v: f"{v:.4g}")]
        if m.get("reused"):
            lines.append(f"  reused fit(s): {', '.join(m['reused'])} (seconds: the saved fit's own time)")
        lines.append(f"  faithfulness curves: {m.get('faithfulness_seconds', float('nan')):.1f} s")
        return "\n".join(lines)

    def identity(self) -> dict[str, Any]:
        """What makes two comparisons the same: model, data, methods and how they are scored."""
        keys = ("model", "task", "methods", "metric", "ablation", "data_fingerprint", "validation_fingerprint")
        return {k: self.meta.get(k) for k in keys}

    def _parts(self) -> dict[str, Result]:
        return {**self.results, FAITHFULNESS: self.faithfulness}

    def _bundle(self) -> Bundle:
        table, agreement = self.table(), self.agreement
        tensors = {f"scores/{k}": v.detach().cpu() for k, v in self.scores.items()}
        fields = {"meta": self.meta, "seconds": self.seconds, "agreement": frame_to_json(agreement)}

        def summary_json(p: Path) -> None:
            import json

            record = {"table": table.to_dict(orient="records"), "agreement": agreement.to_dict(orient="records"),
                      "seconds": self.seconds, "meta": self.meta}
            p.write_text(json.dumps(record, indent=2, default=str, allow_nan=True), encoding="utf-8")

        def figure(p: Path) -> None:
            from . import plot  # plots sit above this layer: imported only to write the figure

            p.write_text(plot.faithfulness_curves(self).to_html(include_plotlyjs=True, full_html=True),
                         encoding="utf-8")

        files = {"comparison.csv": lambda p: table.to_csv(p, index=False), "comparison.json": summary_json,
                 "agreement.csv": lambda p: agreement.to_csv(p, index=False), "faithfulness.html": figure}
        return tensors, fields, files

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike):
        for name in ("meta", "seconds", "agreement"):
            if name not in meta:
                raise ValueError(f"{path}/meta.json lacks {name!r}: not a complete comparison result")
        methods = meta["meta"]["methods"]
        parts = load_parts(meta, path)
        if FAITHFULNESS not in parts:
            raise ValueError(f"{path} lacks its faithfulness result ({FAITHFULNESS}/); write the comparison again")
        scored = [m for m in methods if m != "random"]
        require(tensors, [f"scores/{m}" for m in scored], path, "comparison result")
        results = {m: parts[m] for m in methods if m in parts}
        return cls(results=results, faithfulness=parts[FAITHFULNESS],
                   scores={m: tensors[f"scores/{m}"] for m in scored}, seconds=dict(meta["seconds"]),
                   agreement=frame_from_json(meta["agreement"]), meta=meta["meta"])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class Pairs(NamedTuple):
    """Clean rows and their row-by-row corrupted twins."""

    clean: TaskDataset
    corrupted: TaskDataset


def split_pairs(clean: TaskDataset, corrupted: TaskDataset, val_fraction: float = 0.2,
                seed: int = 0) -> tuple[Pairs, Pairs]:
    """Split paired data into ``(train, held_out)`` pairs, the clean side exactly as
    ``clean.split(val_fraction, seed)`` splits it (the same rows as ``tasks.ioi`` with that seed),
    the corrupted rows following their clean twins.

    Example::

        train, held = split_pairs(*chg_lens.tasks.ioi_pairs(model, n_prompts=80))
        compare_methods(model, train.clean, corrupted=train.corrupted, validation=held.clean)
    """
    from .pairs import check_pair

    check_pair(clean, corrupted)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if len(clean) < 2:
        raise ValueError("need at least two pairs to split")
    perm = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))  # as TaskDataset.split
    n_val = min(max(1, round(len(clean) * val_fraction)), len(clean) - 1)
    train, held = perm[n_val:], perm[:n_val]
    return (Pairs(clean.subset(train), corrupted.subset(train)), Pairs(clean.subset(held), corrupted.subset(held)))


def check_methods(methods: Sequence[str] | str, chg: Any = None) -> list[str]:
    """The method names :func:`compare_methods` will run, checked (a ValueError for an unknown or
    repeated name, or ``chg`` given without "chg" among the methods): a list or a comma-separated
    string; "chg" is replaced by the names of a mapping of CHG fits given as ``chg``.

    Example: ``check_methods("chg,patching", {"chg_2": a, "chg_10": b}) == ["chg_2", "chg_10", "patching"]``.
    """
    from .chg import CHGResult

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods names a method twice: {methods}")
    if chg is None:
        return methods
    if "chg" not in methods:
        raise ValueError("chg= gives a CHG fit to reuse, but 'chg' is not among the methods; add it or drop chg=")
    fits = {"chg": chg} if isinstance(chg, CHGResult) else chg
    if not isinstance(fits, Mapping) or not fits or not all(isinstance(v, CHGResult) for v in fits.values()):
        raise TypeError("chg must be a CHGResult (chg_lens.load(folder)) or a mapping name -> CHGResult")
    names = list(fits)
    bad = [n for n in names if not isinstance(n, str) or not n or n != Path(n).name or n.startswith(".")
           or n == FAITHFULNESS or (n in METHODS and n != "chg")]
    if bad:
        raise ValueError(f"CHG fit names must be plain names other than the other methods and {FAITHFULNESS!r}; "
                         f"got {bad}")
    i = methods.index("chg")
    return methods[:i] + names + methods[i + 1:]


def _chg_fits(chg: Any) -> dict[str, Any]:
    from .chg import CHGResult

    if chg is None:
        return {}
    return {"chg": chg} if isinstance(chg, CHGResult) else dict(chg)


def _fit_seconds(result) -> float:
    """The wall seconds a saved CHG fit took (its stages; the joint G+/G- stage counted once)."""
    sec = result.meta.get("seconds") or {}
    stages = ("g0", "g_plus") if result.config.get("joint", True) else ("g0", "g_plus", "g_minus")
    return float(sum(float(sec.get(s, float("nan"))) for s in stages))


def _check_grid(n_heads: Sequence[int] | None, total: int) -> None:
    if n_heads is None:
        return
    ks = [checks.whole_int("n_heads", k, min=0) for k in n_heads]
    if not ks or max(ks) > total:
        raise ValueError(f"n_heads must be a non-empty list of head counts in [0, {total}]; got {list(n_heads)}")


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def compare_methods(
    model,
    data: TaskDataset,
    *,
    corrupted: TaskDataset | None = None,
    validation: TaskDataset | None = None,
    methods: Sequence[str] | str = METHODS,
    chg: Any = None,
    fit_options: Mapping[str, Any] | None = None,
    ablation: str | TaskDataset = "mean",
    reference: TaskDataset | None = None,
    metric: str = "auto",
    n_heads: Sequence[int] | None = None,
    n_random: int = 5,
    top_k: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    rows_per_pass: int = 256,
    progress: bool = True,
    autocast: str | None = "off",
) -> ComparisonResult:
    """Run each method on ``data``, time it, score every ranking's faithfulness on ``validation``
    and measure how far the methods agree.

    Methods (``methods``, in this order in the result):

    - ``"chg"``: :func:`chg_lens.fit_chg` on ``data`` (with ``validation`` as its validation) and
      ``fit_options`` (its keywords: ``n_seeds``, ``updates``, ``reg_updates``, ``batch_size``,
      ``autocast`` (default ``"auto"``: fits pick their precision), ...); or the fit(s) given as
      ``chg`` (a ``CHGResult``, or a mapping name -> ``CHGResult`` to compare several fits, e.g.
      ``{"chg_2_seeds": a, "chg_10_seeds": b}``: each becomes a method of that name), whose time is
      the fit's own recorded time. Head score: mean facilitation over seeds.
    - ``"attribution"``: :func:`chg_lens.attribution.attribute_heads`: with ``corrupted``, attribution
      patching (AtP, the clean ``z`` patched into the corrupted run, linearised); otherwise the
      linearised effect of mean ablation (mean ``z`` over ``reference``). Head score: ``|effect|``.
    - ``"patching"``: :func:`chg_lens.patching.patch_heads` (every head, every position; needs
      ``corrupted``). Head score: ``|effect|``.
    - ``"ablation"``: :func:`chg_lens.ablation.head_sweep` with mean ablation (mean ``z`` over
      ``reference``). Head score: ``|delta|`` of the metric.
    - ``"random"``: ``n_random`` seeded random orders, averaged (no head scores, no agreement).

    The faithfulness curves (:func:`chg_lens.faithfulness.faithfulness`, one call for all rankings)
    keep each ranking's top-k heads and set the others to ``ablation`` (``"mean"``: mean ``z`` over
    ``reference``, default ``data``; ``"zero"``; or a TaskDataset paired row by row with the
    validation rows, whose ``z`` is patched in) for every k of ``n_heads`` (None: the default grid);
    they are scored on ``validation`` (default: ``data`` itself, in-sample). ``metric``
    (``"auto"``: logit difference when the rows have ``row_meta["answers"]``, else the target
    log-prob; ``"logprob"``, ``"prob"``, ``"logit_diff"``) is what every method measures and what
    the curves normalise. Agreement: Spearman over heads of the head scores and the overlap of the
    ``top_k`` heads of every pair of methods. ``autocast`` is the precision of the measurements
    (default ``"off"``: the model's own dtype; a CHG fit uses ``fit_options["autocast"]``).

    Every input is checked before any work: an unknown method, a method that cannot run on the data
    (``"patching"`` without ``corrupted``), unpaired rows, a bad metric, fit option or k grid is a
    ValueError at once.

    Example::

        cmp = compare_methods(model, train, corrupted=train_corrupted, validation=held,
                              fit_options=dict(n_seeds=2, updates=50, reg_updates=250))
        cmp.table(); cmp.save("runs/compare")
    """
    from . import ablation as ablation_mod
    from .attribution import attribute_heads
    from .chg import check_fit_options, fit_chg
    from .faithfulness import faithfulness, head_scores
    from .pairs import check_pair, resolve_metric
    from .patching import patch_heads

    model = models.as_model(model)
    if not isinstance(data, TaskDataset):
        raise TypeError(f"data must be a TaskDataset; got {type(data).__name__} (a task returns (train, validation))")
    names = check_methods(methods, chg)
    fits = _chg_fits(chg)
    base = [n if n not in fits else "chg" for n in names]
    if corrupted is None:
        missing = [m for m in base if m in NEEDS_PAIRS]
        if missing:
            raise ValueError(f"method(s) {', '.join(missing)} need corrupted rows (corrupted=, e.g. from "
                             "chg_lens.tasks.ioi_pairs); drop them from methods or pass corrupted pairs")
    else:
        check_pair(data, corrupted)
    L, H = models.n_layers(model), models.n_heads(model)
    for label, fit in fits.items():
        if tuple(fit.g_plus.shape[1:]) != (L, H):
            raise ValueError(f"the CHG fit {label!r} is for {tuple(fit.g_plus.shape[1:])} heads; the model has {(L, H)}")
    fit_options = dict(fit_options or {})
    clash = sorted(set(fit_options) & {"validation", "progress", "model", "data"})
    if clash:
        raise ValueError(f"fit_options may not set {clash}: compare_methods passes them itself")
    if "chg" in names and not fits:
        check_fit_options(**fit_options)
    elif fit_options:
        raise ValueError("fit_options are given but no CHG fit runs (chg= reuses fits, or 'chg' is not among the "
                         "methods); drop them")
    eval_data = validation if validation is not None else data
    for d in (data, eval_data, corrupted, reference):
        if d is not None:
            d.check_model(model)
    metric = resolve_metric(metric, data)
    if validation is not None:
        resolve_metric(metric, validation)
    if isinstance(ablation, TaskDataset):
        check_pair(eval_data, ablation)
        ablation.check_model(model)
        ablation_label = f"corrupted:{ablation.name}"
    elif ablation in ABLATIONS:
        ablation_label = ablation
    else:
        raise ValueError(f"ablation must be one of {ABLATIONS} or a corrupted TaskDataset paired with the "
                         f"validation rows; got {ablation!r}")
    _check_grid(n_heads, L * H)
    n_random = checks.positive_int("n_random", n_random)
    top_k = checks.positive_int("top_k", top_k)
    seed = checks.whole_int("seed", seed)
    batch_size = checks.positive_int("batch_size", batch_size)
    rows_per_pass = checks.positive_int("rows_per_pass", rows_per_pass)
    measure = models.resolve_autocast(model, autocast)  # a bad value fails here, before any work
    ref = reference if reference is not None else data
    kw = dict(batch_size=batch_size, progress=progress, autocast=autocast)

    results: dict[str, Result] = {}
    rankings: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    reused: list[str] = []
    for name, method in zip(names, base):
        t0 = time.perf_counter()
        if method == "chg":
            if name in fits:
                res = fits[name]
                reused.append(name)
            else:
                res = fit_chg(model, data, validation=validation, progress=progress, **fit_options)
            ranking: Any = res
        elif method == "attribution":
            res = attribute_heads(model, data, corrupted, reference=None if corrupted is not None else ref,
                                  metric=metric, **kw)
            ranking = res
        elif method == "patching":
            res = patch_heads(model, data, corrupted, metric=metric, rows_per_pass=rows_per_pass, **kw)
            ranking = res
        elif method == "ablation":
            res = ablation_mod.head_sweep(model, data, method="mean", reference=ref, rows_per_pass=rows_per_pass, **kw)
            ranking = res.tensor(f"delta_{'logit_diff' if metric == 'logit_diff' else 'logprob'}").abs()
        else:  # random
            res, ranking = None, None
        seconds[name] = (_fit_seconds(res) if name in reused else 0.0 if method == "random"  # drawn with the curves
                         else time.perf_counter() - t0)
        if res is not None:
            results[name] = res
        rankings[name] = ranking

    t0 = time.perf_counter()
    curves = faithfulness(model, eval_data, rankings, ablation=ablation,
                          reference=ref if isinstance(ablation, str) and ablation == "mean" else None, n_heads=n_heads,
                          metric=metric, n_random=n_random, seed=seed, batch_size=batch_size,
                          rows_per_pass=rows_per_pass, progress=progress, autocast=autocast)
    faithfulness_seconds = time.perf_counter() - t0
    scores = {n: head_scores(r, L, H).detach().cpu() for n, r in rankings.items() if r is not None}
    meta = {"model": models.model_name(model), "task": data.name, "methods": names,
            "corruption": None if corrupted is None else corrupted.name, "n_rows": len(data),
            "n_validation": len(eval_data), "in_sample": validation is None, "n_layers": L, "n_heads": H,
            "metric": metric, "ablation": ablation_label, "n_random": n_random, "top_k": top_k, "seed": seed,
            "n_heads_grid": None if n_heads is None else [int(k) for k in n_heads],
            "reused": reused, "faithfulness_seconds": faithfulness_seconds,
            "chg_seeds": {n: int(results[n].n_seeds) for n, m in zip(names, base) if m == "chg"},
            "data_fingerprint": data.fingerprint(), "validation_fingerprint": eval_data.fingerprint(),
            "versions": library_versions(), **models.precision_meta(model, measure)}
    return ComparisonResult(results=results, faithfulness=curves, scores=scores, seconds=seconds,
                            agreement=agreement_frame(scores, top_k), meta=meta)


__all__ = ["METHODS", "ComparisonResult", "Pairs", "agreement_frame", "check_methods", "compare_methods", "spearman",
           "split_pairs", "top_heads", "top_k_overlap"]
