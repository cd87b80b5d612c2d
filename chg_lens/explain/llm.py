"""The LLM explainer: explain heads with an LLM through the ``openai`` client and simulate their
activity with it.

:class:`OpenAIExplainer` prompts an LLM (any OpenAI-compatible endpoint; key from
``OPENAI_API_KEY``, never logged or saved) with the salient events, the pattern evidence
(:func:`evidence_lines`) and the probe scores, and asks a simulator model to predict activity per
token from the explanation alone. A call that fails after its retries raises :class:`LLMError`;
:func:`parse_explanation` and :func:`parse_simulation` read the models' answers.

Example::

    ex = OpenAIExplainer(base_url="http://localhost:8000/v1", model="qwen2.5-7b-instruct")
    rec = ex.explain(raw, i, train_windows, events)       # status "ok" or "failed" (with the error)
    pred = ex.predict(rec, raw.tokens[held_out], raw.token_str)   # [windows, pos], 0-10
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from .events import show
from .patterns import pattern_fits, pattern_name
from .probes import describe, probe_lookup
from .record import RawActivity

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining what one attention head in a transformer language "
    "model does. You see text excerpts where the head's output is large; the token where it is active is "
    "marked [[like this]], and 'attends to' lists the earlier tokens it looks at (position, weight). "
    "Activity is scaled from 0 to 10. You also see how much attention it gives each standard pattern where "
    "that pattern applies, against chance; its share on the first token, which is a resting state (an "
    "attention sink) rather than a pattern; and its scores on standard diagnostic probes (repeated random "
    "token sequences). Name the head by the pattern it follows beyond its resting state. Describe in ONE "
    "sentence which tokens make it active and what it attends to. Answer exactly as: Explanation: <one sentence>"
)
SIMULATE_SYSTEM = (
    "You predict how active an attention head of a language model is at each token, from an explanation "
    "of the head alone. For each numbered token give an activity from 0 (inactive) to 10 (maximal). "
    "Answer with one line per token, exactly as: <index>: <activity>"
)


class LLMError(RuntimeError):
    """An LLM call failed after its retries; the message never contains the API key."""


class OpenAIExplainer:
    """Explain heads with an LLM through the ``openai`` client, and simulate with it.

    Any OpenAI-compatible endpoint works (``base_url``). The key comes from ``api_key`` or
    ``OPENAI_API_KEY``; it is held only by the client and scrubbed from error messages.
    Transient errors (429, 408/409, 5xx, timeouts, connection errors) are retried ``max_retries``
    times with exponential backoff (``Retry-After`` is honoured, capped at ``max_backoff``);
    ``requests_per_minute`` spaces calls out.

        ex = OpenAIExplainer(base_url="http://localhost:8000/v1", model="qwen2.5-7b-instruct")
    """

    name = "openai"

    def __init__(self, model: str = "gpt-4o-mini", base_url: str | None = None, simulator_model: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0,
                 max_backoff: float = 30.0, requests_per_minute: float | None = None, prompt_events: int = 20,
                 sim_windows: int = 6, max_tokens: int = 300):
        try:
            import openai
        except ImportError as err:
            raise ImportError("the openai explainer needs the `openai` package: pip install 'chg_lens[explain]'") from err
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            if not base_url:
                raise ValueError("the openai explainer needs OPENAI_API_KEY in the environment (or --base-url of a "
                                 "local OpenAI-compatible server that needs no key)")
            key = "no-key"
        self._openai = openai
        self._key = key
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.model, self.simulator_model = model, simulator_model or model
        self.base_url = base_url
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.min_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.prompt_events, self.sim_windows, self.max_tokens = prompt_events, sim_windows, max_tokens
        self._last_call = 0.0
        self.calls = 0

    def settings(self) -> dict[str, Any]:
        """What to record about this explainer (never the key)."""
        return {"explainer": self.name, "llm_model": self.model, "simulator_model": self.simulator_model,
                "base_url": self.base_url}

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def chat(self, messages: list[dict[str, str]], model: str | None = None) -> str:
        """One chat completion with retries; returns the message text or raises :class:`LLMError`."""
        openai = self._openai
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            wait = self.min_interval - (time.monotonic() - self._last_call)
            if wait > 0:
                time.sleep(wait)
            self._last_call = time.monotonic()
            self.calls += 1
            try:
                resp = self._client.chat.completions.create(model=model or self.model, messages=messages,
                                                            temperature=0.0, max_tokens=self.max_tokens)
                return resp.choices[0].message.content or ""
            except (openai.APITimeoutError, openai.APIConnectionError) as err:
                last, delay = err, None
            except openai.APIStatusError as err:
                if err.status_code not in (408, 409, 429) and err.status_code < 500:
                    raise LLMError(self.scrub(f"HTTP {err.status_code}: {err.message}")) from None
                last = err
                delay = _retry_after(err)
            if attempt < self.max_retries:
                time.sleep(min(self.max_backoff, delay if delay is not None else self.backoff * 2 ** attempt))
        raise LLMError(self.scrub(f"{type(last).__name__} after {self.max_retries + 1} attempts: {last}")) from None

    # -- explain
    def prompt(self, raw: RawActivity, head_index: int, events: pd.DataFrame, windows: np.ndarray | None = None
               ) -> list[dict[str, str]]:
        layer, head = raw.heads[head_index]
        top = events[events.kind == "top"].head(self.prompt_events)
        low = events[events.kind == "random"].head(max(3, self.prompt_events // 4))
        scale = max(float(top.activity.max()) if len(top) else 1.0, 1e-9)
        lines = [f"Attention head: layer {layer}, head {head}.", ""]
        lines += evidence_lines(raw, head_index, windows if windows is not None else np.unique(events.window))
        lines += ["", "Excerpts where it is most active:"]
        for n, r in enumerate(top.itertuples(), 1):
            lines.append(f"{n}. activity {10 * r.activity / scale:.0f} | {r.context} | attends to: {r.attended}")
        lines += ["", "Excerpts where it is NOT active:"]
        for n, r in enumerate(low.itertuples(), 1):
            lines.append(f"{n}. activity {10 * r.activity / scale:.0f} | {r.context} | attends to: {r.attended}")
        lines += ["", "What does this head do? Answer as: Explanation: <one sentence>"]
        return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]

    def explain(self, raw: RawActivity, head_index: int, windows: np.ndarray, events: pd.DataFrame) -> dict[str, Any]:
        layer, head = raw.heads[head_index]
        record = {"layer": layer, "head": head, **self.settings(), "hypothesis": None}
        try:
            text = parse_explanation(self.chat(self.prompt(raw, head_index, events, windows)))
            if not text:
                raise LLMError("the model's answer held no explanation")
            record.update(explanation=text, status="ok", error=None)
        except Exception as err:  # a failed head is recorded, never fatal
            msg = str(err) if isinstance(err, LLMError) else f"{type(err).__name__}: {err}"
            record.update(explanation="", status="failed", error=self.scrub(msg))
        return record

    # -- simulate
    def simulate_window(self, explanation: str, tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        """Predicted activity (0-10) per token of one window, from the explanation alone."""
        listing = "\n".join(f"{i}: {show(token_str.get(int(t), '?'))!r}" for i, t in enumerate(tokens))
        user = f"Explanation of the head: {explanation}\n\nTokens:\n{listing}\n\nPredicted activity, one line per token:"
        answer = self.chat([{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}],
                           model=self.simulator_model)
        return parse_simulation(answer, len(tokens))

    def predict(self, record: dict[str, Any], tokens: np.ndarray, token_str: dict[int, str]) -> np.ndarray:
        if record.get("status") != "ok":
            raise LLMError("no explanation to simulate")
        return np.stack([self.simulate_window(record["explanation"], row, token_str) for row in tokens])


def evidence_lines(raw: RawActivity, head_index: int, windows: np.ndarray) -> list[str]:
    """Prompt lines: each pattern's attention where it applies vs chance, the resting share, the probes."""
    layer, head = raw.heads[head_index]
    windows = np.asarray(windows, dtype=np.int64)
    masses = {p: m[head_index][windows] for p, m in raw.masses.items()} if raw.masses is not None else None
    fits = pattern_fits(raw.tokens[windows], raw.sources[head_index][windows], raw.weights[head_index][windows],
                        masses)
    parts = [f"{pattern_name(p)} {f['fit']:.0%} (chance {f['chance']:.0%}, applies at {f['coverage']:.0%} of tokens)"
             for p, f in fits.items() if p != "first_token"]
    probes = probe_lookup(raw.probes).get((layer, head))
    return ["Attention where each pattern applies: " + "; ".join(parts) + ".",
            f"Resting state: {fits['first_token']['fit']:.0%} of its attention is on the first token.",
            "Probe scores on repeated random tokens (induction: Olsson et al. 2022; 0-1): " + describe(probes) + "."]


def _retry_after(err) -> float | None:
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def parse_explanation(answer: str) -> str:
    """The sentence after ``Explanation:`` (or the first non-empty line), stripped of quotes."""
    m = re.search(r"explanation\s*:\s*(.+)", answer, flags=re.IGNORECASE)
    text = m.group(1) if m else next((line for line in answer.splitlines() if line.strip()), "")
    return text.strip().strip('"').strip("'").strip()


def parse_simulation(answer: str, n: int) -> np.ndarray:
    """``"<index>: <activity>"`` lines -> array of ``n`` predictions (missing tokens get 0)."""
    out = np.zeros(n, dtype=np.float64)
    for m in re.finditer(r"^\s*(\d+)\s*[:=\t-]\s*(-?\d+(?:\.\d+)?)", answer, flags=re.MULTILINE):
        i = int(m.group(1))
        if 0 <= i < n:
            out[i] = float(m.group(2))
    return out


__all__ = ["EXPLAIN_SYSTEM", "LLMError", "OpenAIExplainer", "SIMULATE_SYSTEM", "evidence_lines",
           "parse_explanation", "parse_simulation"]
