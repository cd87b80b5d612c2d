"""results.cached (fit or load) and results.load (the class by meta.json's kind)."""

import pandas as pd
import pytest

import chg_lens
from chg_lens.ablation import AblationResult
from chg_lens.results import cached


def _result(value: float) -> AblationResult:
    frame = pd.DataFrame({"layer": [0, 1], "head": [1, 0], "delta_logprob": [value, -value]})
    return AblationResult(frame, {"logprob": -1.5}, {"n_layers": 2, "n_heads": 2})


def test_cached_fits_once_then_loads_and_refuses_other_settings(tmp_path):
    calls = []

    def fit(folder):
        calls.append(folder)
        return _result(0.25)

    first = cached(tmp_path / "fit", {"updates": 4, "tasks": ("a", "b")}, fit)
    again = cached(tmp_path / "fit", {"updates": 4, "tasks": ("a", "b")}, fit)
    assert calls == [tmp_path / "fit"]                       # the second call loads
    assert isinstance(again, AblationResult)
    pd.testing.assert_frame_equal(again.frame, first.frame)
    assert again.meta["cache_key"] == {"tasks": ["a", "b"], "updates": 4}
    with pytest.raises(ValueError, match=r"other settings \(updates\)"):
        cached(tmp_path / "fit", {"updates": 5, "tasks": ["a", "b"]}, fit)
    assert len(calls) == 1


def test_load_returns_the_class_of_the_saved_kind(tmp_path):
    _result(0.5).save(tmp_path / "abl")
    back = chg_lens.load(tmp_path / "abl")
    assert type(back) is AblationResult and back.tensor()[0, 1].item() == 0.5
    with pytest.raises(FileNotFoundError):
        chg_lens.load(tmp_path / "missing")


def test_logprobs_is_a_deprecated_alias_of_scoring():
    import importlib
    import sys
    import warnings

    from chg_lens import scoring

    sys.modules.pop("chg_lens.logprobs", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("chg_lens.logprobs")
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert old.evaluate is scoring.evaluate and old.row_logprobs is scoring.row_logprobs


def test_every_result_class_declares_its_kind_and_refuses_another():
    from chg_lens import results

    for kind in results.KINDS:
        cls = results.result_class(kind)
        assert issubclass(cls, results.Result) and cls.kind == kind
    assert _result(0.5).to_frame() is not None


def test_loading_a_result_as_the_wrong_class_is_an_error(tmp_path):
    from chg_lens.patching import PatchResult

    _result(0.5).save(tmp_path / "abl")
    with pytest.raises(ValueError, match="holds a 'ablation' result, not a patching result"):
        PatchResult.load(tmp_path / "abl")
