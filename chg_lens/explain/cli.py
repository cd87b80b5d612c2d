"""Arguments and entry point of ``chg-lens explain`` (registered in :mod:`chg_lens.cli`).

    chg-lens explain --model smollm2-135m-instruct --sources wikitext --wikitext-dir ../shared/data/wikitext-2 \\
        --windows 100 --window-len 64 --topk 50 --max-heads 20 --explainer pattern --outdir runs/explain
"""

from __future__ import annotations

import argparse
import time

from .cluster import DEFAULT_EMBEDDING


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="offline alias, .gguf file, local folder or hub name (default: %(default)s)")
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
    p.add_argument("--embedding-model", default=DEFAULT_EMBEDDING, help="sentence embedding model (default: %(default)s)")
    p.add_argument("--min-cluster-size", type=int, default=5, help="HDBSCAN min cluster size (default: %(default)s)")
    p.add_argument("--chg-result", default=None, help="a CHG results folder: join each head's role into the report")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    from ..cli import add_autocast_option

    add_autocast_option(p)
    p.add_argument("--outdir", default="runs/explain", help="output folder (default: %(default)s)")
    for step, name in (("cache", "raw_events.parquet"), ("explain", "explanations.jsonl"),
                       ("simulate", "scores.parquet"), ("cluster", "clusters.json")):
        p.add_argument(f"--skip-{step}", action="store_true", help=f"reuse OUTDIR/{name}")
    p.add_argument("--no-progress", action="store_true")


def run_cli(a: argparse.Namespace) -> int:
    from .. import load_model
    from .pipeline import ExplainConfig, run_explain

    cfg = ExplainConfig(sources=a.sources, n_windows=a.windows, window_len=a.window_len, topk=a.topk,
                        max_heads=a.max_heads, heads=a.heads, explainer=a.explainer, base_url=a.base_url,
                        llm_model=a.llm_model, simulator_model=a.simulator_model, sim_windows=a.sim_windows,
                        requests_per_minute=a.requests_per_minute, embedding_model=a.embedding_model,
                        min_cluster_size=a.min_cluster_size, batch_size=a.batch_size, seed=a.seed,
                        stackexchange_dir=a.stackexchange_dir, wikitext_dir=a.wikitext_dir, chg_result=a.chg_result,
                        autocast=a.autocast)
    cfg.check()
    t0 = time.time()
    model = a.model if a.skip_cache else load_model(a.model, device=a.device)
    out = run_explain(model, a.outdir, cfg, skip_cache=a.skip_cache, skip_explain=a.skip_explain,
                      skip_simulate=a.skip_simulate, skip_cluster=a.skip_cluster, progress=not a.no_progress)
    ok = out.summary[out.summary.status == "ok"]
    print(f"explained {len(ok)} of {len(out.summary)} heads; mean simulation score "
          f"{ok.simulation_score.mean():.3f}, detection {ok.detection_score.mean():.3f}; steps run: "
          f"{', '.join(out.steps_run)} ({time.time() - t0:.0f}s)")
    print(f"wrote {out.outdir}/ (raw_events.parquet, explanations.jsonl, scores.parquet, clusters.json, "
          "report.md, summary.csv)")
    return 0
