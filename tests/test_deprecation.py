"""Old call styles that keep working for one release: renamed keywords and positional options."""

import warnings

import pytest
import torch

from chg_lens import evaluate, fit_chg
from chg_lens.deprecation import keyword_only, renamed

from conftest import known_answer_data


@keyword_only("a", "b")
def _f(x, *, a=1, b=2, c=3):
    return x, a, b, c


def test_keyword_only_maps_old_positions_and_warns():
    with pytest.warns(DeprecationWarning, match="passing a, b by position"):
        assert _f(0, 10, 20) == (0, 10, 20, 3)
    with pytest.warns(DeprecationWarning, match="passing a by position"):
        assert _f(0, 10, c=30) == (0, 10, 2, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _f(0, a=5) == (0, 5, 2, 3)                     # keyword calls stay silent


def test_keyword_only_rejects_too_many_or_doubled_arguments():
    with pytest.raises(TypeError, match="at most 3 positional"):
        _f(0, 1, 2, 3)
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        _f(0, 1, a=2)


def test_renamed_maps_old_keyword_and_warns():
    @renamed(old="new")
    def g(*, new=0):
        return new

    with pytest.warns(DeprecationWarning, match=r"g\(old=...\) is now new="):
        assert g(old=4) == 4
    with pytest.raises(TypeError, match="both old= and new="):
        g(old=1, new=2)


def test_fit_chg_positional_options_still_work_with_a_warning(known_model):
    data = known_answer_data(8)
    kw = dict(n_seeds=1, updates=2, reg_updates=2, batch_size=4, lam=0.1, seed=3)
    new = fit_chg(known_model, data, **kw, progress=False)
    with pytest.warns(DeprecationWarning, match="by position"):
        old = fit_chg(known_model, data, 1, 2, 2, 4, 0.1, 3, progress=False)
    for stage in ("g0", "g_plus", "g_minus"):
        assert torch.equal(new.gates[stage], old.gates[stage])
    with pytest.raises(TypeError, match="at most"):
        fit_chg(known_model, data, 1, 2, 2, 4, 0.1, 3, 7)


def test_a_deprecation_warning_raised_inside_chg_lens_fails_a_test():
    """pyproject's filterwarnings: a DeprecationWarning that points at a chg_lens module is an error
    (the library must not call deprecated names); one from another library is ignored."""
    with pytest.raises(DeprecationWarning, match="inside chg_lens"):
        warnings.warn_explicit("inside chg_lens", DeprecationWarning, "chg_lens/scoring.py", 1, module="chg_lens.scoring")
    warnings.warn_explicit("elsewhere", DeprecationWarning, "lib.py", 1, module="some_library.lib")  # no error


def test_the_warning_points_at_the_deprecated_call_not_at_the_library(known_model):
    @keyword_only("a")
    @renamed(old="a")
    def h(x, *, a=0):
        return a

    data = known_answer_data(4)
    with pytest.warns(DeprecationWarning) as got:
        assert h(0, 1) == 1 and h(0, old=2) == 2
        evaluate(known_model, data, max_rows_per_pass=8)  # under torch.no_grad as well
    assert len(got) == 3 and {w.filename for w in got} == {__file__}
