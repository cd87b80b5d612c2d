"""Head explanations: describe what each attention head does, score the description by simulation,
cluster the descriptions, and join them with CHG roles (``chg-lens explain``).

Example::

    from chg_lens.explain import ExplainConfig, run_explain
    out = run_explain("smollm2-135m-instruct", "runs/explain",
                      ExplainConfig(sources="wikitext", n_windows=100, window_len=64, max_heads=10,
                                    wikitext_dir="../shared/data/wikitext-2"))
"""

from .cluster import cluster_explanations, embed
from .events import salient_events, split_windows, token_class
from .llm import LLMError, OpenAIExplainer
from .pattern_explainer import PatternExplainer, label_from_text, label_of
from .patterns import correlation, pattern_fits, pattern_sources
from .pipeline import ExplainConfig, ExplainOutput, ExplainResult, run_explain
from .probes import PROBES, load_probes, probe_scores, write_probes
from .protocol import Explainer
from .record import RawActivity, load_raw, pattern_masks, record_to_parquet, select_heads
from .report import build_summary, write_explain_report, write_report
from .simulate import detection_score, probe_agreement, score_all, score_head
from .sources import Windows, sample_windows

__all__ = [
    "ExplainConfig", "ExplainOutput", "ExplainResult", "Explainer", "LLMError", "OpenAIExplainer", "PROBES", "PatternExplainer",
    "RawActivity", "Windows", "build_summary", "cluster_explanations", "correlation", "detection_score", "embed",
    "label_from_text", "label_of", "load_probes", "load_raw", "pattern_fits", "pattern_masks", "pattern_sources",
    "probe_agreement", "probe_scores", "record_to_parquet", "run_explain", "salient_events", "sample_windows",
    "score_all", "score_head", "select_heads", "split_windows", "token_class", "write_explain_report", "write_probes",
    "write_report",
]
