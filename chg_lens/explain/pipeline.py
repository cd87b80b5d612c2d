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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .. import models
from .cluster import DEFAULT_EMBEDDING, cluster_explanations
from .events import salient_events, split_windows
from .explainers import OpenAIExplainer, PatternExplainer
from .probes import probe_scores, write_probes
from .record import PROBES_FILE, load_raw, parse_heads, record_to_parquet, select_heads
from .report import build_summary, check_chg_model, write_explain_report
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
class ExplainOutput:
    outdir: Path
    records: list[dict[str, Any]]
    scores: pd.DataFrame
    clusters: dict[str, Any]
    summary: pd.DataFrame
    steps_run: list[str] = field(default_factory=list)

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in records))
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_explain(model: Any, outdir: str | os.PathLike, config: ExplainConfig | None = None, *,
                skip_cache: bool = False, skip_explain: bool = False, skip_simulate: bool = False,
                skip_cluster: bool = False, explainer: Any = None, progress: bool = True) -> ExplainOutput:
    """Run (or reuse) every step and return the records, scores, clusters and summary.

    ``model`` is a model object or anything :func:`chg_lens.load_model` takes; it is loaded only
    when the recording step runs. ``explainer`` overrides the one ``config`` names (any object
    with ``name``, ``explain(raw, head_index, windows, events)`` and ``predict(record, tokens, token_str)``).
    """
    from .. import checks

    cfg = config or ExplainConfig()
    cfg.check()
    chg = cfg.chg()
    outdir = checks.output_dir(outdir, "outdir")
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {n: outdir / n for n in (RAW, EXPLANATIONS, SIM_SCORES, CLUSTERS)}
    for flag, name in (("--skip-cache", RAW), ("--skip-explain", EXPLANATIONS), ("--skip-simulate", SIM_SCORES),
                       ("--skip-cluster", CLUSTERS)):
        if {"--skip-cache": skip_cache, "--skip-explain": skip_explain, "--skip-simulate": skip_simulate,
            "--skip-cluster": skip_cluster}[flag]:
            _need(paths[name], flag)
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
        tmp = paths[SIM_SCORES].with_name(SIM_SCORES + ".tmp")
        scores.to_parquet(tmp, index=False)
        os.replace(tmp, paths[SIM_SCORES])
        steps.append("simulate")
    scores = pd.read_parquet(paths[SIM_SCORES])

    if not skip_cluster:
        clusters = cluster_explanations(records, cfg.min_cluster_size, cfg.embedding_model)
        tmp = paths[CLUSTERS].with_name(CLUSTERS + ".tmp")
        tmp.write_text(json.dumps(clusters, indent=2, sort_keys=True))
        os.replace(tmp, paths[CLUSTERS])
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
    write_explain_report(summary, outdir, clusters, task, title=f"Head explanations: {raw.meta.get('model')}",
                 settings=settings)
    steps.append("report")
    return ExplainOutput(outdir=outdir, records=records, scores=scores, clusters=clusters, summary=summary,
                         steps_run=steps)
