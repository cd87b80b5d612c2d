"""Old call styles that keep working for one release: renamed keywords and positional options."""

import warnings

import pandas as pd
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


# ----------------------------------------------------------------------------- issue 27: one vocabulary
KEYWORD_ONLY = {  # function -> (positional parameters, first keyword-only option)
    "scoring.evaluate": (("model", "data", "gates"), "batch_size"),
    "scoring.score_configs": (("model", "data", "configs", "sources", "positions"), "base"),
    "chg.validate": (("model", "data", "result"), "batch_size"),
    "contrastive.evaluate_contrastive": (("model", "gates", "retain", "forget"), "batch_size"),
    "sweep.run_sweep": (("config",), "executor"),
    "sweep.collect": (("config",), "require_complete"),
}


@pytest.mark.parametrize("name", list(KEYWORD_ONLY))
def test_options_are_keyword_only_after_model_and_data(name):
    import importlib
    import inspect

    module, fn = name.split(".")
    params = inspect.signature(getattr(importlib.import_module(f"chg_lens.{module}"), fn)).parameters
    positional, first = KEYWORD_ONLY[name]
    assert [p for p, v in params.items() if v.kind == v.POSITIONAL_OR_KEYWORD] == list(positional)
    assert params[first].kind == inspect.Parameter.KEYWORD_ONLY
    assert all(v.kind == v.KEYWORD_ONLY for p, v in params.items() if p not in positional)


def test_one_batch_size_default_for_every_measurement():
    import inspect

    import chg_lens.cli.options
    from chg_lens import ablation, chg, cli, contrastive, patching, scoring

    fns = [scoring.evaluate, scoring.score_configs, scoring.collect_z, chg.validate, contrastive.evaluate_contrastive,
           ablation.head_sweep, ablation.sequential_ablation, ablation.figure2, patching.patch_heads]
    assert {f.__name__: inspect.signature(f).parameters["batch_size"].default for f in fns} == \
        {f.__name__: 32 for f in fns}
    for command in ("ablate", "patch"):  # the command line's --batch-size: the same default
        import argparse
        import importlib

        p = argparse.ArgumentParser()
        importlib.import_module(f"chg_lens.cli.{command}").add_arguments(p)
        assert p.get_default("batch_size") == 32 == cli.options.SCORING_BATCH_SIZE, command


def test_old_positional_options_of_evaluate_and_score_configs_still_work(known_model):
    from chg_lens import scoring

    data = known_answer_data(6)
    cfg = torch.rand(3, 1, 4, generator=torch.Generator().manual_seed(0))
    new = scoring.evaluate(known_model, data, cfg, batch_size=4, rows_per_pass=8)
    with pytest.warns(DeprecationWarning, match="passing batch_size, rows_per_pass by position"):
        old = scoring.evaluate(known_model, data, cfg, 4, 8)
    assert torch.equal(new.logprob_sum, old.logprob_sum)
    base = torch.full((1, 4), 0.5)
    new = scoring.score_configs(known_model, data, cfg, None, None, base=base, prefix_reuse=False)
    with pytest.warns(DeprecationWarning, match="passing base, answers, prefix_reuse by position"):
        old = scoring.score_configs(known_model, data, cfg, None, None, base, "auto", False)
    assert torch.equal(new.logprob_sum, old.logprob_sum)


def test_validate_takes_data_then_result_and_the_old_order_warns(known_model):
    from chg_lens import validate

    data, val = known_answer_data(8), known_answer_data(6, seed=1)
    result = fit_chg(known_model, data, n_seeds=2, updates=2, reg_updates=2, batch_size=4, progress=False)
    new = validate(known_model, val, result, batch_size=4)
    assert list(new.gates) == ["none", "g0", "g0", "g_plus", "g_plus", "g_minus", "g_minus"]
    with pytest.warns(DeprecationWarning, match=r"validate\(model, data, result\)") as got:
        old = validate(known_model, result, val, batch_size=4)
    assert got[0].filename == __file__  # points at this call, not at chg_lens
    with pytest.warns(DeprecationWarning, match="passing batch_size by position"):
        both = validate(known_model, result, val, 4)
    pd.testing.assert_frame_equal(new, old)
    pd.testing.assert_frame_equal(new, both)
    with pytest.raises(TypeError, match="takes a TaskDataset and a CHGResult"):
        validate(known_model, val, val)


def test_contrastive_evaluation_is_validation_and_old_folders_load(known_model, tmp_path):
    import json

    from chg_lens import ContrastiveResult, evaluate_contrastive, fit_contrastive

    data, val = known_answer_data(8), known_answer_data(6, seed=1)
    res = fit_contrastive(known_model, data, data, updates=2, batch_size=4, validation=(val, val), progress=False)
    assert res.meta["n_validation"] == 6 and len(res.meta["validation_fingerprints"]) == 2
    assert "n_eval" not in res.meta and len(res.validation) == 4
    with pytest.warns(DeprecationWarning, match=r"\.evaluation is now \.validation"):
        assert res.evaluation is res.validation
    with pytest.warns(DeprecationWarning, match="by position"):
        ev = evaluate_contrastive(known_model, res, val, val, 4)
    pd.testing.assert_frame_equal(ev, res.validation)
    folder = res.save(tmp_path / "c")
    assert (folder / "validation.csv").exists() and not (folder / "evaluation.csv").exists()
    # a folder saved before the rename: "evaluation" and n_eval / eval_fingerprints in meta.json
    meta = json.loads((folder / "meta.json").read_text())
    meta["evaluation"] = meta.pop("validation")
    meta["meta"]["n_eval"] = meta["meta"].pop("n_validation")
    meta["meta"]["eval_fingerprints"] = meta["meta"].pop("validation_fingerprints")
    meta.pop("meta_digest")  # folders of that time had no digest of meta.json itself (format 2)
    meta["format"] = 2
    (folder / "meta.json").write_text(json.dumps(meta))
    back = ContrastiveResult.load(folder)
    pd.testing.assert_frame_equal(back.validation, res.validation)
    assert back.meta["n_validation"] == 6 and back.meta["validation_fingerprints"] == res.meta["validation_fingerprints"]
