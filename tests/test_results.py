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
    with pytest.raises(ValueError, match=r"holds a result of kind 'ablation' made with other settings \(updates\)"):
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


# ----------------------------------------------------------------------------- one save, one load
def _old_save(result, path):
    """What each class's own ``save`` wrote before the one :meth:`Result.save` (the bodies of
    CHGResult.save, ContrastiveResult.save and FrameResult.save, verbatim): the folder layout of
    results saved by earlier releases."""
    from chg_lens import CHGResult, ContrastiveResult
    from chg_lens.results import frame_to_json, pack_stages, save_bundle

    if isinstance(result, CHGResult):
        tensors = pack_stages(result.logits, result.traces, result.snapshots, result.snapshot_steps)
        meta = {"kind": result.kind, "config": result.config, "meta": result.meta,
                "validation": None if result.validation is None else frame_to_json(result.validation)}
        scores = result.scores()
        return save_bundle(path, tensors, meta, identity=result.identity(),
                           files={"scores.csv": lambda p: scores.to_csv(p, index=False)})
    if isinstance(result, ContrastiveResult):  # before `evaluation` was renamed `validation` (and its meta keys)
        tensors = pack_stages({"contrast": result.logits}, {"contrast": result.traces}, {"contrast": result.snapshots},
                              {"contrast": result.snapshot_steps})
        renamed = {"n_validation": "n_eval", "validation_fingerprints": "eval_fingerprints"}
        inner = {renamed.get(k, k): v for k, v in result.meta.items()}
        meta = {"kind": result.kind, "config": result.config, "meta": inner,
                "evaluation": None if result.validation is None else frame_to_json(result.validation)}
        gates, ev = result.gates_frame(), result.validation
        files = {"gates.csv": lambda p: gates.to_csv(p, index=False)}
        if ev is not None:
            files["evaluation.csv"] = lambda p: ev.to_csv(p, index=False)
        return save_bundle(path, tensors, meta, files=files, identity=result.identity())
    frame = result.frame
    return save_bundle(path, result.tensors_to_save(), {"kind": result.kind, "frame": frame_to_json(frame),
                                                        "baseline": result.baseline, "meta": result.meta},
                       files={"frame.parquet": lambda p: frame.to_parquet(p, index=False),
                              "frame.csv": lambda p: frame.to_csv(p, index=False)},
                       identity=result.identity())


@pytest.fixture(scope="module")
def every_kind(known_model):
    """One result of each kind: a CHG and a contrastive fit (2 updates, with validation), an
    ablation sweep and a patching result."""
    import torch

    from chg_lens.patching import PatchResult

    from conftest import known_answer_data

    data, val = known_answer_data(8), known_answer_data(4, seed=1)
    chg = chg_lens.fit_chg(known_model, data, n_seeds=2, updates=2, reg_updates=2, batch_size=4, validation=val,
                           progress=False)
    contrastive = chg_lens.fit_contrastive(known_model, data, data, n_seeds=2, updates=2, batch_size=4,
                                           validation=(val, val), progress=False)
    patch = PatchResult(pd.DataFrame({"layer": [0, 0], "head": [0, 2], "effect": [0.75, -0.25], "se": [0.1, 0.2],
                                      "t": [7.5, -1.25], "p": [0.001, 0.3], "mediating": [True, False]}),
                        torch.tensor([[0.5, 1.0], [-0.25, -0.25]]), {"clean": -0.5, "corrupted": -2.0},
                        {"n_layers": 1, "n_heads": 4, "mode": "patch"})
    return {"chg": chg, "contrastive": contrastive, "ablation": _result(0.25), "patching": patch}


STAGE_TENSORS = lambda stage, traces: ([f"logits/{stage}", f"snapshots/{stage}", f"snapshot_steps/{stage}"]
                                       + [f"trace/{stage}/{t}" for t in traces])
LAYOUT = {  # kind -> (files, meta.json keys, tensor names): the folder layout results have always had
    "chg": ({"tensors.safetensors", "meta.json", "scores.csv"},
            {"kind", "config", "meta", "validation", "identity", "format", "digests", "files", "meta_digest"},
            {*STAGE_TENSORS("g0", ["nll", "loss"]), *STAGE_TENSORS("g_plus", ["nll", "reg", "loss"]),
             *STAGE_TENSORS("g_minus", ["nll", "reg", "loss"])}),
    "contrastive": ({"tensors.safetensors", "meta.json", "gates.csv", "validation.csv"},
                    {"kind", "config", "meta", "validation", "identity", "format", "digests", "files", "meta_digest"},
                    set(STAGE_TENSORS("contrast", ["retain_nll", "forget_nll", "forget_term", "reg", "loss"]))),
    "ablation": ({"tensors.safetensors", "meta.json", "frame.parquet", "frame.csv"},
                 {"kind", "frame", "baseline", "meta", "identity", "format", "digests", "files", "meta_digest"}, {"delta_logprob"}),
    "patching": ({"tensors.safetensors", "meta.json", "frame.parquet", "frame.csv"},
                 {"kind", "frame", "baseline", "meta", "identity", "format", "digests", "files", "meta_digest"},
                 {"per_prompt", "effects"}),
}


def _same(x, y, where: str) -> None:
    """``x`` and ``y`` hold the same data: tensors equal (and of the same dtype), frames equal,
    dicts with the same keys and the same values."""
    import torch

    if isinstance(x, pd.DataFrame):
        pd.testing.assert_frame_equal(x, y, obj=where)
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            _same(x[k], y[k], f"{where}[{k!r}]")
    else:
        assert x == y, where


def _assert_same(a, b):
    import dataclasses

    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        _same(getattr(a, f.name), getattr(b, f.name), f.name)


@pytest.mark.parametrize("kind", list(LAYOUT))
def test_one_save_writes_the_layout_of_earlier_releases_and_one_load_is_exact(every_kind, kind, tmp_path):
    from safetensors import safe_open

    from chg_lens.results import read_meta

    result = every_kind[kind]
    new = result.save(tmp_path / "new")
    old = _old_save(result, tmp_path / "old")
    files, keys, tensors = LAYOUT[kind]
    rename = {"evaluation.csv": "validation.csv", "evaluation": "validation"} if kind == "contrastive" else {}
    assert {p.name for p in new.iterdir()} == files == {rename.get(p.name, p.name) for p in old.iterdir()}
    meta = read_meta(new)
    assert set(meta) == keys and meta["kind"] == kind and meta["files"] == sorted(files - {"meta.json"})
    with safe_open(str(new / "tensors.safetensors"), "pt") as f:
        assert set(f.keys()) == tensors
    if kind == "contrastive":  # `evaluation` is `validation` now (n_eval, eval_fingerprints too): the same data
        old_meta = read_meta(old)
        assert old_meta["evaluation"] == meta["validation"] and old_meta["meta"]["n_eval"] == meta["meta"]["n_validation"]
        assert old_meta["meta"]["eval_fingerprints"] == meta["meta"]["validation_fingerprints"]
        assert old_meta["digests"]["gates.csv"] == meta["digests"]["gates.csv"]
        assert old_meta["digests"]["evaluation.csv"] == meta["digests"]["validation.csv"]
    else:  # byte for byte what the per-class saves wrote: equal digests of every file, equal meta.json
        assert meta == read_meta(old)
        assert (new / "meta.json").read_bytes() == (old / "meta.json").read_bytes()
    for folder in (new, old):  # a folder of an earlier release loads unchanged; load(save(x)) is x
        _assert_same(type(result).load(folder), result)
        _assert_same(chg_lens.load(folder), result)


def test_every_result_class_uses_the_one_save_and_load():
    from chg_lens import results

    for kind in results.KINDS:
        cls = results.result_class(kind)
        assert cls.save is results.Result.save
        assert cls.load.__func__ is results.Result.load.__func__
