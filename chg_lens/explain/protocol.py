"""What the explain pipeline needs from an explainer: the :class:`Explainer` protocol.

:func:`~chg_lens.explain.pipeline.run_explain` (``explainer=``) and
:func:`~chg_lens.explain.simulate.score_all` take any object that satisfies it;
:class:`~chg_lens.explain.pattern_explainer.PatternExplainer` and
:class:`~chg_lens.explain.llm.OpenAIExplainer` are two. :class:`Explainer` shows how to plug in your own.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from .record import RawActivity


@runtime_checkable
class Explainer(Protocol):
    """An explainer: one record per head from its recorded activity, and the activity that record
    predicts on other windows (for the simulation score).

    - ``name``: written as the ``explainer`` of each record and score row (and the progress bar).
    - ``explain(raw, head_index, windows, events)``: the record of head ``raw.heads[head_index]``
      explained from the windows ``windows`` (indices into ``raw.tokens``) and its salient events
      there (:func:`~chg_lens.explain.events.salient_events`). A JSON-serialisable dict with
      ``layer``, ``head``, ``explainer``, ``status`` ("ok" or "failed"), ``error`` (``None`` or a
      message), ``explanation`` (one sentence) and ``hypothesis`` (anything ``predict`` needs, or
      ``None``); a failed head is a record with ``status="failed"``, never an exception.
    - ``predict(record, tokens, token_str)``: the predicted activity ``[windows, pos]`` (float) for
      the token ids ``tokens`` ``[windows, pos]`` from the record alone (``token_str``: id -> text).
      Called only for records with ``status == "ok"``; an exception is recorded as a failed score row.

    Read when present, not required: ``sim_windows`` (at most this many held-out windows are
    simulated per head; absent or ``None``: all) and ``scrub(text) -> text`` (applied to a failed
    prediction's error message, e.g. to remove an API key). ``isinstance(obj, Explainer)`` checks
    that ``name``, ``explain`` and ``predict`` exist (not their signatures).

    Example: an explainer of your own that calls every head a previous-token head and predicts its
    activity from the position alone (the label in ``scores.parquet`` is then read from the
    sentence, :func:`~chg_lens.explain.pattern_explainer.label_of`)::

        import numpy as np
        from chg_lens.explain import Explainer, run_explain

        class PositionExplainer:
            name = "position"

            def explain(self, raw, head_index, windows, events):
                layer, head = raw.heads[head_index]
                return {"layer": layer, "head": head, "explainer": self.name, "status": "ok", "error": None,
                        "explanation": "Previous-token head: attends to the token just before it.",
                        "hypothesis": None}

            def predict(self, record, tokens, token_str):
                return np.broadcast_to(np.arange(tokens.shape[1], dtype=np.float64), tokens.shape)

        assert isinstance(PositionExplainer(), Explainer)
        run_explain("smollm2-135m-instruct", "runs/explain-position", cfg, explainer=PositionExplainer())
    """

    name: str

    def explain(self, raw: RawActivity, head_index: int, windows: np.ndarray, events: pd.DataFrame
                ) -> dict[str, Any]:
        ...

    def predict(self, record: dict[str, Any], tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        ...


__all__ = ["Explainer"]
