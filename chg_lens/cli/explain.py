"""``chg-lens explain``: explain what attention heads do, score the explanations, cluster them, join CHG roles.

    chg-lens explain --model smollm2-135m-instruct --sources wikitext --wikitext-dir ../shared/data/wikitext-2 \\
        --windows 100 --window-len 64 --topk 50 --max-heads 20 --explainer pattern --out runs/explain
"""

from __future__ import annotations

import argparse
import os
import time

from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..explain.cluster import DEFAULT_EMBEDDING

    options.add_model(p)
    p.add_argument("--sources", default="wikitext",
                   help="comma-separated: wikitext, stackexchange, hf:NAME[:CONFIG[:SPLIT]], or local .txt/.jsonl "
                        "files/folders (default: %(default)s)")
    p.add_argument("--wikitext-dir", default=None,
                   help="local WikiText folder of .txt files (e.g. ../shared/data/wikitext-2); default: Hugging Face")
    p.add_argument("--stackexchange-dir", default=None, help="folder written by EleutherAI's stackexchange-dataset")
    p.add_argument("--windows", type=int, default=1500, help="text windows to sample (default: %(default)s)")
    p.add_argument("--window-len", type=int, default=192, help="tokens per window (default: %(default)s)")
    p.add_argument("--topk", type=int, default=200, help="top-K salient events per head (default: %(default)s)")
    p.add_argument("--max-heads", type=int, default=200, help="at most this many heads (default: %(default)s)")
    p.add_argument("--heads", default=None, help="explicit heads LAYER.HEAD,... (default: all, capped by --max-heads)")
    p.add_argument("--explainer", choices=["pattern", "openai"], default="pattern")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="explainer model (default: %(default)s)")
    p.add_argument("--simulator-model", default=None, help="simulator model (default: --llm-model)")
    p.add_argument("--sim-windows", type=int, default=6, help="held-out windows the LLM simulates per head")
    p.add_argument("--requests-per-minute", type=float, default=None, help="space LLM calls out")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per LLM request (default: %(default)s)")
    p.add_argument("--llm-retries", type=int, default=4,
                   help="retries of a failed LLM request (429, 5xx, timeouts; default: %(default)s)")
    p.add_argument("--embedding-model", default=DEFAULT_EMBEDDING, help="sentence embedding model (default: %(default)s)")
    p.add_argument("--min-cluster-size", type=int, default=5, help="HDBSCAN min cluster size (default: %(default)s)")
    p.add_argument("--chg-result", default=None, help="a CHG results folder: join each head's role into the report")
    p.add_argument("--probe-sequences", type=int, default=10,
                   help="repeated random token sequences for the induction / previous-token / duplicate-token / "
                        "sink probes, written to OUT/probes.parquet (0: no probes; default: %(default)s)")
    p.add_argument("--probe-length", type=int, default=50, help="tokens per copy in a probe sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    options.add_seed(p, help="seed of the sampled windows")
    p.add_argument("--device", default=None, help="device to run on, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", "--outdir", dest="out", default=options.OUT["explain"],
                   help="output folder (default: %(default)s; --outdir is an alias)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds another result or other files (default: refuse)")
    options.add_autocast(p)
    for step, name in (("cache", "raw_events.parquet"), ("explain", "explanations.jsonl"),
                       ("simulate", "scores.parquet"), ("cluster", "clusters.json")):
        p.add_argument(f"--skip-{step}", action="store_true", help=f"reuse OUT/{name}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a: argparse.Namespace) -> int:
    from .. import models
    from ..explain.pipeline import ExplainConfig, run_explain

    cfg = ExplainConfig(sources=a.sources, n_windows=a.windows, window_len=a.window_len, topk=a.topk,
                        max_heads=a.max_heads, heads=a.heads, explainer=a.explainer, base_url=a.base_url,
                        llm_model=a.llm_model, simulator_model=a.simulator_model, sim_windows=a.sim_windows,
                        requests_per_minute=a.requests_per_minute, embedding_model=a.embedding_model,
                        min_cluster_size=a.min_cluster_size, batch_size=a.batch_size, seed=a.seed,
                        probe_sequences=a.probe_sequences, probe_length=a.probe_length,
                        stackexchange_dir=a.stackexchange_dir, wikitext_dir=a.wikitext_dir, chg_result=a.chg_result,
                        llm_timeout=a.llm_timeout, llm_retries=a.llm_retries, autocast=a.autocast)
    cfg.check()  # every option, and --chg-result loads as a CHG result, before the model loads
    from .. import checks

    checks.device(a.device)
    from ..explain.pipeline import ExplainResult
    from ..results import check_target

    check_target(a.out, ExplainResult.kind, None, a.overwrite, what="--out", own=ExplainResult.OWN_FILES)
    if a.explainer == "openai" and not a.skip_explain and not os.environ.get("OPENAI_API_KEY") and not a.base_url:
        raise ValueError("--explainer openai needs OPENAI_API_KEY in the environment (or --base-url of a local "
                         "OpenAI-compatible server that needs no key); nothing was loaded")
    t0 = time.time()
    model = a.model if a.skip_cache else models.load_model(a.model, device=a.device)
    out = run_explain(model, a.out, cfg, skip_cache=a.skip_cache, skip_explain=a.skip_explain,
                      skip_simulate=a.skip_simulate, skip_cluster=a.skip_cluster, progress=not a.no_progress,
                      overwrite=a.overwrite)
    ok = out.summary[out.summary.status == "ok"]
    print(f"explained {len(ok)} of {len(out.summary)} heads; mean simulation score "
          f"{ok.simulation_score.mean():.3f}, detection {ok.detection_score.mean():.3f}; steps run: "
          f"{', '.join(out.steps_run)} ({time.time() - t0:.0f}s)")
    print(f"wrote {out.outdir}/ (raw_events.parquet, probes.parquet, explanations.jsonl, scores.parquet, clusters.json, "
          "report.md, summary.csv, meta.json: chg_lens.load opens it)")
    return 0
