"""The explainers, by the names they had in one module; the code lives by concept beside it.

- :mod:`chg_lens.explain.patterns`: pattern statistics (:func:`pattern_sources`, :func:`pattern_fits`,
  :func:`correlation`, the pattern names and texts);
- :mod:`chg_lens.explain.pattern_explainer`: the offline :class:`PatternExplainer` and its text labels
  (:func:`label_of`, :func:`label_from_text`);
- :mod:`chg_lens.explain.llm`: the LLM client :class:`OpenAIExplainer`, :class:`LLMError` and the
  answer parsers;
- :mod:`chg_lens.explain.protocol`: :class:`Explainer`, what the pipeline needs from an explainer.

Every name importable from this module before the split still is (``from
chg_lens.explain.explainers import PatternExplainer`` keeps working).

Example::

    ex = PatternExplainer()
    rec = ex.explain(raw, i, train_windows, events)       # {"layer", "head", "explanation", "hypothesis", ...}
    pred = ex.predict(rec, raw.tokens[held_out], raw.token_str)   # [windows, pos]
"""

from __future__ import annotations

from .events import context as show_context
from .llm import (EXPLAIN_SYSTEM, SIMULATE_SYSTEM, LLMError, OpenAIExplainer, _retry_after, evidence_lines,
                  parse_explanation, parse_simulation)
from .pattern_explainer import HEAD_NAMES, WHEN_TEXT, _TEXT_LABELS, PatternExplainer, _round, label_from_text, label_of
from .patterns import (PATTERN_TEXT, PATTERNS, _topk_masses, correlation, pattern_fits, pattern_name, pattern_sources,
                       pattern_text)
from .protocol import Explainer

__all__ = ["PatternExplainer", "OpenAIExplainer", "LLMError", "correlation", "evidence_lines", "label_from_text",
           "label_of", "parse_explanation", "parse_simulation", "pattern_fits", "pattern_sources", "show_context",
           "Explainer", "EXPLAIN_SYSTEM", "SIMULATE_SYSTEM", "HEAD_NAMES", "WHEN_TEXT", "PATTERN_TEXT", "PATTERNS",
           "pattern_name", "pattern_text"]
