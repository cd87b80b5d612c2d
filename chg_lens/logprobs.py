"""Deprecated: moved to :mod:`chg_lens.scoring` (kept importable for one release)."""

import warnings

from .scoring import RowScores, evaluate, row_logprobs  # noqa: F401

warnings.warn("chg_lens.logprobs is now chg_lens.scoring; import RowScores, evaluate and row_logprobs from there",
              DeprecationWarning, stacklevel=2)
