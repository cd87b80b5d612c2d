"""The head-explanation pipeline: each step writes one file in ``outdir`` and can be skipped to
reuse it (``skip_cache`` / ``skip_explain`` / ``skip_simulate`` / ``skip_cluster``).

1. sample text windows and record head activity -> ``raw_events.parquet``
   and score every recorded head on the diagnostic probes -> ``probes.parquet``
2. salient events + explain each head          -> ``explanations.jsonl``
3. score explanations by simulation            -> ``scores.parquet``
4. cluster the explanations                    -> ``clusters.json``
5. report (always rebuilt from the files)      -> ``report.md``, ``summary.csv``

Example::

    from chg_lens.explain import ExplainConfig, run_explain
    cfg = ExplainConfig(sources="wikitext", n_windows=200, window_len=128, max_heads=20,
                        wikitext_dir="../shared/data/wikitext-2")
    out = run_explain("smollm2-135m-instruct", "runs/explain", cfg)
    out.summary.head()
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from .. import models, store
from ..results import (Bundle, Result, check_frame_heads, check_target, frame_from_json, frame_to_json, head_tensor,
                       library_versions, loaded_shape, require_fields)
from .cluster import DEFAULT_EMBEDDING, cluster_explanations
from .events import salient_events, split_windows
from .explainers import OpenAIExplainer, PatternExplainer
from .probes import probe_scores, write_probes
from .record import PROBES_FILE, load_raw, parse_heads, record_to_parquet, select_heads
from .report import build_summary, check_chg_model, report_texts
from .simulate import score_all
from .sources import check_sources, parse_sources, sample_windows

RAW, EXPLANATIONS, SIM_SCORES, CLUSTERS, REPORT, SUMMARY = (
    "raw_events.parquet", "explanations.jsonl", "scores.parquet", "clusters.json", "report.md", "summary.csv")


@dataclass
class ExplainConfig:
    """Options of :func:`run_explain` (the seed's defaults: 1500 windows of 192 tokens, top 200 events,
    200 heads, all-MiniLM-L6-v2, HDBSCAN min cluster size 5)."""

    sources: str | list[str] = "wikitext"
    n_windows: int = 1500
    window_len: int = 192
    topk: int = 200
    max_heads: int | None = 200
    heads: Any = None                    # "0.1,2.3" or [(0, 1), ...]; None = all (capped by max_heads)
    explainer: str = "pattern"           # pattern | openai
    base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    simulator_model: str | None = None
    sim_windows: int = 6                 # held-out windows the LLM simulator sees per head
    llm_timeout: float = 60.0
    llm_retries: int = 4
    llm_backoff: float = 1.0
    requests_per_minute: float | None = None
    embedding_model: str = DEFAULT_EMBEDDING
    min_cluster_size: int = 5
    batch_size: int = 8
    top_sources: int = 3
    probe_sequences: int = 10            # repeated random token sequences for the probes (0: no probes)
    probe_length: int = 50               # tokens per copy (cut to the model's context)
    holdout_fraction: float = 0.5
    seed: int = 0
    stackexchange_dir: str | None = None
    wikitext_dir: str | None = None
    chg_result: str | None = None
    autocast: str | None = "off"       # precision of the recording passes: off (model dtype) | auto | bf16 | fp16

    def check(self) -> None:
        """Clear errors for bad options, before any long work (and before a model loads): each
        option named as the command line spells it; ``chg_result`` must load as a CHG result."""
        from .. import checks

        check_sources(parse_sources(self.sources), self.stackexchange_dir, self.wikitext_dir)
        if self.explainer not in ("pattern", "openai"):
            raise ValueError(f"--explainer must be pattern or openai, not {self.explainer!r}")
        for name, flag in (("n_windows", "--windows"), ("window_len", "--window-len"), ("topk", "--topk"),
                           ("batch_size", "--batch-size"), ("top_sources", "top_sources"),
                           ("sim_windows", "--sim-windows"), ("llm_retries", "--llm-retries")):
            checks.whole_int(flag, getattr(self, name), min=0 if name == "llm_retries" else 1)
        if self.max_heads is not None:
            checks.positive_int("--max-heads", self.max_heads)
        checks.whole_int("--seed", self.seed)
        checks.whole_int("--probe-sequences", self.probe_sequences, min=0)
        if self.probe_sequences:
            checks.whole_int("--probe-length", self.probe_length, min=3)
        checks.whole_int("--min-cluster-size", self.min_cluster_size, min=2)
        checks.finite_float("--llm-timeout", self.llm_timeout, min=0, min_open=True)
        if self.requests_per_minute is not None:
            checks.finite_float("--requests-per-minute", self.requests_per_minute, min=0, min_open=True)
        checks.finite_float("holdout_fraction", self.holdout_fraction, min=0, max=1, min_open=True)
        if self.chg_result is not None:
            self.chg()
        parse_heads(self.heads)

    def chg(self):
        """The CHG result of ``chg_result`` (None without one), loaded and verified; a ValueError
        naming ``--chg-result`` when the folder holds no CHG result or a damaged one."""
        if self.chg_result is None:
            return None
        from ..chg import CHGResult

        if not Path(self.chg_result).is_dir():
            raise ValueError(f"--chg-result {self.chg_result} is not a CHG result folder")
        try:
            return CHGResult.load(self.chg_result)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"--chg-result: {err}") from None


@dataclass
class ExplainResult(Result):
    """An explain output folder as a saved result (kind ``"explain"``): the summary table (one row
    per explained head: explanation, scores, cluster, probe scores, CHG role), the clusters, the
    options and what the run recorded (model, shape, weights' fingerprint, CHG task, steps run).
    :func:`run_explain` saves it into its output folder last, beside the step files
    (``raw_events.parquet``, ``explanations.jsonl``, ...), which stay where they are; ``report.md``
    and ``summary.csv`` are written by the save, with digests. ``chg_lens.load(outdir)`` returns it.

    Example::

        result = chg_lens.load("runs/explain")      # ExplainResult
        result.summary.sort_values("simulation_score").tail()
        result.tensor("simulation_score")            # [n_layers, n_heads], NaN for heads not explained
    """

    kind = "explain"
    noun = "an explain result"
    OWN_FILES = ("raw_events.parquet", PROBES_FILE, "explanations.jsonl", "scores.parquet", "clusters.json",
                 "report.md", "summary.csv")

    summary: pd.DataFrame
    clusters: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.summary

    def tensor(self, column: str) -> Tensor:
        """``column`` of the summary as ``[n_layers, n_heads]`` (NaN for heads not explained)."""
        L = self.meta.get("n_layers") or int(self.summary["layer"].max()) + 1
        H = self.meta.get("n_heads") or int(self.summary["head"].max()) + 1
        return head_tensor(self.summary, column, int(L), int(H))

    def identity(self) -> None:
        """None: a rerun of the pipeline in the same folder replaces its explain result."""
        return None

    def _bundle(self) -> Bundle:
        texts = report_texts(self.summary, self.clusters, self.meta.get("task"),
                             self.meta.get("title", "Head explanations"), self.meta.get("settings"))
        files = {name: (lambda p, text=text: p.write_text(text, encoding="utf-8")) for name, text in texts.items()}
        return ({}, {"summary": frame_to_json(self.summary), "clusters": self.clusters, "config": self.config,
                     "meta": self.meta}, files)

    @classmethod
    def _from_bundle(cls, tensors: dict[str, Tensor], meta: dict[str, Any], path: str | os.PathLike) -> "ExplainResult":
        require_fields(meta, ["summary", "config", "meta"], path, cls.noun)
        if not isinstance(meta["meta"], dict) or not isinstance(meta["config"], dict):
            raise ValueError(f"{path}: meta.json's 'meta' and 'config' must be JSON objects; write the result again")
        try:
            summary = frame_from_json(meta["summary"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: meta.json's summary is not a table ({type(err).__name__}: {err}); write the "
                             "result again") from None
        check_frame_heads(summary, loaded_shape(meta["meta"], path), path)
        return cls(summary=summary, clusters=meta.get("clusters") or {}, config=meta["config"], meta=meta["meta"])


@dataclass
class ExplainOutput:
    """What :func:`run_explain` returns: the records, scores, clusters and summary of the run, the
    steps it ran, and ``result``, the :class:`ExplainResult` it saved in ``outdir``."""

    outdir: Path
    records: list[dict[str, Any]]
    scores: pd.DataFrame
    clusters: dict[str, Any]
    summary: pd.DataFrame
    steps_run: list[str] = field(default_factory=list)
    result: ExplainResult | None = None

    def path(self, name: str) -> Path:
        return self.outdir / name


def make_explainer(cfg: ExplainConfig):
    if cfg.explainer == "pattern":
        return PatternExplainer()
    return OpenAIExplainer(model=cfg.llm_model, base_url=cfg.base_url, simulator_model=cfg.simulator_model,
                           timeout=cfg.llm_timeout, max_retries=cfg.llm_retries, backoff=cfg.llm_backoff,
                           requests_per_minute=cfg.requests_per_minute, sim_windows=cfg.sim_windows)


def _need(path: Path, flag: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{flag} reuses {path}, which does not exist: run once without {flag}")


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """One JSON object a line, written atomically (:func:`chg_lens.store.write_text`)."""
    store.write_text(path, "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_explain(model: Any, outdir: str | os.PathLike, config: ExplainConfig | None = None, *,
                skip_cache: bool = False, skip_explain: bool = False, skip_simulate: bool = False,
                skip_cluster: bool = False, explainer: Any = None, progress: bool = True,
                overwrite: bool = False) -> ExplainOutput:
    """Run (or reuse) every step and return the records, scores, clusters and summary; the folder
    ends as an :class:`ExplainResult` (``meta.json``, ``report.md``, ``summary.csv`` beside the
    step files), which ``chg_lens.load(outdir)`` opens.

    ``model`` is a model object or anything :func:`chg_lens.load_model` takes; it is loaded only
    when the recording step runs. ``explainer`` overrides the one ``config`` names (any object
    with ``name``, ``explain(raw, head_index, windows, events)`` and ``predict(record, tokens, token_str)``).
    ``outdir`` must be new, empty, or hold this pipeline's files (a folder holding another result or
    other files is refused before any work, unless ``overwrite``); one run at a time writes it.

    Example::

        out = run_explain(model, "runs/explain", ExplainConfig(n_windows=200, max_heads=20))
        chg_lens.load("runs/explain").summary.equals(out.result.summary)
    """
    from .. import checks

    cfg = config or ExplainConfig()
    cfg.check()
    chg = cfg.chg()
    outdir = checks.output_dir(outdir, "outdir")
    check_target(outdir, ExplainResult.kind, None, overwrite, what="outdir", own=ExplainResult.OWN_FILES)
    paths = {n: outdir / n for n in (RAW, EXPLANATIONS, SIM_SCORES, CLUSTERS)}
    for flag, name in (("--skip-cache", RAW), ("--skip-explain", EXPLANATIONS), ("--skip-simulate", SIM_SCORES),
                       ("--skip-cluster", CLUSTERS)):
        if {"--skip-cache": skip_cache, "--skip-explain": skip_explain, "--skip-simulate": skip_simulate,
            "--skip-cluster": skip_cluster}[flag]:
            _need(paths[name], flag)
    outdir.mkdir(parents=True, exist_ok=True)
    run_lock = outdir.absolute().parent / f".{outdir.name}.explain.lock"
    with store.lock(run_lock, f"the explain output {outdir}"):  # one run writes the step files at a time
        steps: list[str] = []
        need_explainer = not skip_explain or not skip_simulate
        if explainer is None and need_explainer:
            explainer = make_explainer(cfg)

        if not skip_cache:
            model = models.as_model(model)
            model_meta = {"model": models.model_name(model), "n_layers": models.n_layers(model),
                          "n_heads": models.n_heads(model), "weights": models.weights_fingerprint(model)}
            if chg is not None:
                check_chg_model(chg, model_meta, cfg.chg_result)  # before the long recording
            windows = sample_windows(model, cfg.sources, cfg.n_windows, cfg.window_len, cfg.seed,
                                     cfg.stackexchange_dir, cfg.wikitext_dir)
            heads = select_heads(model, parse_heads(cfg.heads), cfg.max_heads, cfg.seed)
            record_to_parquet(model, windows, heads, paths[RAW], cfg.batch_size, cfg.top_sources,
                              meta={**model_meta, "seed": cfg.seed}, progress=progress, autocast=cfg.autocast)
            probes_path = outdir / PROBES_FILE
            if cfg.probe_sequences:
                write_probes(probe_scores(model, heads, n_sequences=cfg.probe_sequences, length=cfg.probe_length,
                                          seed=cfg.seed), probes_path)
            elif probes_path.exists():
                probes_path.unlink()             # never leave another run's probes beside these windows
            steps.append("cache")
        raw = load_raw(paths[RAW])
        if chg is not None:
            check_chg_model(chg, raw.meta, cfg.chg_result, heads=raw.heads)
        train, held_out = split_windows(raw.tokens.shape[0], cfg.holdout_fraction)

        if not skip_explain:
            records = []
            for i in tqdm(range(len(raw.heads)), desc=f"explain ({explainer.name})", disable=not progress):
                events = salient_events(raw, i, train, cfg.topk, seed=cfg.seed)
                records.append(explainer.explain(raw, i, train, events))
            write_jsonl(records, paths[EXPLANATIONS])
            steps.append("explain")
        records = read_jsonl(paths[EXPLANATIONS])

        if not skip_simulate:
            scores = score_all(explainer, records, raw, held_out, topk=cfg.topk, seed=cfg.seed, progress=progress)
            store.write_table(scores, paths[SIM_SCORES])
            steps.append("simulate")
        scores = pd.read_parquet(paths[SIM_SCORES])

        if not skip_cluster:
            clusters = cluster_explanations(records, cfg.min_cluster_size, cfg.embedding_model)
            store.write_json(paths[CLUSTERS], clusters, indent=2, sort_keys=True)
            steps.append("cluster")
        clusters = json.loads(paths[CLUSTERS].read_text())

        summary, task = build_summary(records, scores, clusters, chg, probes=raw.probes)
        explainer_name = records[0].get("explainer", cfg.explainer) if records else cfg.explainer
        settings = {"model": raw.meta.get("model"), "sources": ", ".join(sorted(set(raw.meta.get("sources", [])))),
                    "windows": f"{raw.meta['n_windows']} x {raw.meta['window_len']} tokens "
                               f"({len(train)} explained, {len(held_out)} held out)",
                    "explainer": explainer_name}
        if records and records[0].get("llm_model"):
            settings["llm model"] = records[0]["llm_model"]
        steps.append("report")
        result = ExplainResult(summary=summary, clusters=clusters, config=asdict(cfg), meta={
            "model": raw.meta.get("model"), **{k: raw.meta[k] for k in ("n_layers", "n_heads", "weights")
                                              if raw.meta.get(k) is not None},
            "task": task, "chg_result": cfg.chg_result, "title": f"Head explanations: {raw.meta.get('model')}",
            "settings": settings, "steps_run": steps, "n_explained": len(summary),
            "files": sorted(n for n in ExplainResult.OWN_FILES if (outdir / n).exists()),
            "versions": library_versions()})
        result.save(outdir, overwrite=overwrite)  # meta.json, report.md, summary.csv; the step files stay
    return ExplainOutput(outdir=outdir, records=records, scores=scores, clusters=clusters, summary=summary,
                         steps_run=steps, result=result)
