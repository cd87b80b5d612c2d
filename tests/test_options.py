"""One source per option set (issue 27 item 1): each fit's options are declared once, in its option
dataclasses; the public signature, the docstring, the validation and the command line's flags are
derived from them, and CHG and contrastive fits share one skeleton (fitting.run_fit)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import pydoc
import warnings
from pathlib import Path

import pytest
import torch

import chg_lens
from chg_lens import chg, contrastive, fitting, options
from chg_lens.cli import main
from chg_lens.cli import options as cli_options
from chg_lens.deprecation import keyword_only

FITS = {  # function, its option sets, its subcommand, the CLI's defaults, positional parameters
    "fit_chg": (chg.fit_chg, chg.FIT_OPTIONS, "fit", cli_options.FIT_DEFAULTS, ["model", "data"]),
    "fit_contrastive": (contrastive.fit_contrastive, contrastive.FIT_OPTIONS, "contrast", cli_options.CONTRAST_DEFAULTS,
                        ["model", "retain", "forget"]),
}

# the public options as they were before they were derived (names and defaults users call by keyword)
PUBLIC = {
    "fit_chg": dict(n_seeds=10, updates=500, reg_updates=500, batch_size=64, lam=0.1, seed=0, validation=None, lr=0.1,
                    lr_end=0.01, reg_lr=0.5, reg_lr_end=0.1, clip=4.0, grad_accum=1, joint=True, snapshot_every=10,
                    checkpoint_dir=None, checkpoint_every=50, task=None, progress=True, autocast="auto",
                    configs_per_pass=None, stop_when_settled=False),
    "fit_contrastive": dict(n_seeds=1, updates=500, batch_size=64, lam=0.1, max_diff=5.0, lr=0.1, lr_end=0.01,
                            clip=4.0, seed=0, grad_accum=1, snapshot_every=10, one_pass=None, check_pairs=True,
                            validation=None, checkpoint_dir=None, checkpoint_every=50, progress=True,
                            configs_per_pass=None, autocast="auto"),
}


def tiny_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (n, 6), generator=g), torch.arange(6).expand(n, 6) >= 4)


def subparser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    __import__(f"chg_lens.cli.{command}", fromlist=["add_arguments"]).add_arguments(p)
    return p


# ----------------------------------------------------------------------------- signature = dataclasses
@pytest.mark.parametrize("name", list(FITS))
def test_the_signature_is_the_option_sets(name):
    fn, sets, *_, positional = FITS[name]
    params = inspect.signature(fn).parameters
    assert [p for p, v in params.items() if v.kind == v.POSITIONAL_OR_KEYWORD] == positional
    keyword = {p: v for p, v in params.items() if p not in positional}
    assert all(v.kind == v.KEYWORD_ONLY for v in keyword.values())
    fields = options.option_fields(*sets)
    assert list(keyword) == [f.name for f in fields]                    # names, in declaration order
    assert {p: v.default for p, v in keyword.items()} == {f.name: f.default for f in fields}
    assert {p: v.annotation for p, v in keyword.items()} == {f.name: f.type for f in fields}
    assert {p: v.default for p, v in keyword.items()} == PUBLIC[name]   # the public names and defaults kept
    assert all(options.help_of(f) and "\n" not in options.help_of(f) for f in fields)  # one-line help each
    config = sets[0]  # the fit's identity: every config field but the derived ones is an option
    assert {f.name for f in dataclasses.fields(config) if f.metadata.get("parameter", True)} <= set(keyword)
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)  # help(): the signature, every default and help line
    assert str(inspect.signature(fn)) in text
    for f in fields:
        assert f"{f.name}: {f.type!r} = {f.default!r}" in text, f.name
        assert f"- ``{f.name}`` ({f.type}, default ``{f.default!r}``): {options.help_of(f)}" in text, f.name


def test_chg_identity_keys_keep_their_names():
    """Saved results' ``config`` dicts keep loading: the field names of the configs are those saved."""
    assert [f.name for f in dataclasses.fields(chg.CHGConfig)] == [
        "n_seeds", "updates", "reg_updates", "batch_size", "lam", "seed", "lr", "lr_end", "reg_lr", "reg_lr_end",
        "clip", "grad_accum", "joint", "snapshot_every", "stop_when_settled", "settle_thresholds"]
    assert [f.name for f in dataclasses.fields(contrastive.ContrastiveConfig)] == [
        "n_seeds", "updates", "batch_size", "lam", "max_diff", "lr", "lr_end", "clip", "seed", "grad_accum",
        "snapshot_every"]
    th = chg_lens.diagnostics.Thresholds(move=0.02)
    cfg = chg.CHGConfig.from_options(stop_when_settled=th, n_seeds=2.0)
    assert cfg.stop_when_settled is True and cfg.settle_thresholds == dataclasses.asdict(th)
    assert cfg.n_seeds == 2 and type(cfg.n_seeds) is int and type(chg.CHGConfig.from_options(lam=1).lam) is float


# ----------------------------------------------------------------------------- flags = dataclasses
@pytest.mark.parametrize("name", list(FITS))
def test_the_cli_flags_are_the_option_sets(name):
    fn, sets, command, cli_defaults, _ = FITS[name]
    module = __import__(f"chg_lens.cli.{command}", fromlist=["NOT_FLAGS"])
    actions = {a.dest: a for a in subparser(command)._actions}
    fields = {f.name: f for f in options.option_fields(*sets)}
    assert set(cli_defaults) <= set(fields)  # the CLI's own defaults are all options
    assert set(module.NOT_FLAGS) <= set(fields) and set(cli_options.SHARED_FIT_FLAGS) <= set(fields)
    for n, f in fields.items():
        if n in module.NOT_FLAGS:  # set by the command itself (fit_kwargs below does not take them from flags)
            continue
        if n == "progress":  # add_run's --no-progress
            assert actions["no_progress"].default is False and f.default is True
            continue
        a = actions[n]
        assert a.option_strings[0] in ("--" + n.replace("_", "-"), "--no-" + n.replace("_", "-")), n
        assert a.default == cli_defaults.get(n, f.default), n
        kind = options.value_type(options.owner(sets, n), n)
        if kind is bool:
            assert a.const is (not f.default) and a.nargs == 0, n
        elif n != "autocast":  # add_run's --autocast has choices
            assert a.type is kind, n
        if n not in cli_options.SHARED_FIT_FLAGS:
            assert options.help_of(f).replace("%", "%%") in a.help, n
    # what the command passes to the fit is exactly the options it offers
    args = subparser(command).parse_args([])
    kwargs = module.fit_kwargs(args)
    assert set(kwargs) == set(fields) - set(module.NOT_FLAGS)
    assert {k: v for k, v in kwargs.items() if k != "progress"} == \
        {k: cli_defaults.get(k, fields[k].default) for k in kwargs if k != "progress"}


def test_compare_offers_the_same_chg_flags_as_fit():
    fit, cmp = subparser("fit"), subparser("compare")
    from chg_lens.cli.compare import FIT_FLAGS

    for n in FIT_FLAGS:
        f, c = next(a for a in fit._actions if a.dest == n), next(a for a in cmp._actions if a.dest == n)
        assert (f.default, f.type, f.help) == (c.default, c.type, c.help), n


# ----------------------------------------------------------------------------- validation = check()
def cli_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err.split(": error: ", 1)[1]


CONTRAST = ["contrast", "--retain", "ioi", "--forget", "ioi"]


@pytest.mark.parametrize("name, flags, kwargs", [
    ("fit_chg", ["--lam", "nan"], dict(lam=float("nan"))),
    ("fit_chg", ["--n-seeds", "0"], dict(n_seeds=0)),
    ("fit_chg", ["--checkpoint-every", "0"], dict(checkpoint_every=0)),
    ("fit_chg", ["--configs-per-pass", "0"], dict(configs_per_pass=0)),
    ("fit_chg", ["--clip", "0"], dict(clip=0.0)),
    ("fit_contrastive", ["--max-diff", "inf"], dict(max_diff=float("inf"))),
    ("fit_contrastive", ["--lam", "-1"], dict(lam=-1.0)),
    ("fit_contrastive", ["--checkpoint-every", "0"], dict(checkpoint_every=0)),
    ("fit_contrastive", ["--updates", "0"], dict(updates=0)),
])
def test_a_bad_value_gives_the_same_message_through_the_function_and_the_cli(name, flags, kwargs, tiny_model,
                                                                            tmp_path, capsys, monkeypatch,
                                                                            no_model_load):
    fn, *_, positional = FITS[name]
    monkeypatch.setattr(fitting, "run_stages", lambda *a, **k: pytest.fail("fitting started"))
    d = tiny_data()
    with pytest.raises(ValueError) as err:
        fn(tiny_model, *[d] * (len(positional) - 1), progress=False, **kwargs)
    command = ["fit"] if name == "fit_chg" else CONTRAST
    assert cli_error([*command, "--out", str(tmp_path / "o"), *flags], capsys) == str(err.value)


@pytest.mark.parametrize("name", list(FITS))
def test_validation_comes_from_check(name, tiny_model, tmp_path, capsys, monkeypatch, no_model_load):
    """The config's check() is what the function, check_fit_options / the CLI's check and the CLI run."""
    fn, sets, command, *_, positional = FITS[name]

    def refuse(self):
        raise ValueError(f"refused by {type(self).__name__}.check")

    monkeypatch.setattr(sets[0], "check", refuse)
    d = tiny_data()
    with pytest.raises(ValueError, match=f"refused by {sets[0].__name__}.check"):
        fn(tiny_model, *[d] * (len(positional) - 1), progress=False)
    if name == "fit_chg":
        with pytest.raises(ValueError, match="refused by CHGConfig.check"):
            chg.check_fit_options(n_seeds=2)
    args = ["fit"] if name == "fit_chg" else CONTRAST
    assert cli_error([*args, "--out", str(tmp_path / "o")], capsys) == f"refused by {sets[0].__name__}.check"


def test_check_fit_options_is_derived_and_keeps_its_behaviour(tmp_path):
    chg.check_fit_options(n_seeds=4, lam=0.1, checkpoint_every=25, model="m", data="d", task="ioi",
                          stop_when_settled=chg_lens.diagnostics.Thresholds(), configs_per_pass=2, autocast="bf16")
    (tmp_path / "f").write_text("a file")
    for bad, match in [(dict(nope=1), r"fit_chg does not take \['nope'\]"),
                       (dict(checkpoint_every=0), "checkpoint_every must be at least 1"),
                       (dict(autocast="fp8"), "autocast must be one of"),
                       (dict(progress="yes"), "progress must be true or false"),
                       (dict(checkpoint_dir=tmp_path / "f" / "x"), "lies inside"),
                       (dict(configs_per_pass=1.5), "configs_per_pass must be a positive int")]:
        with pytest.raises(ValueError, match=match):
            chg.check_fit_options(**bad)
    with pytest.raises(TypeError, match="stop_when_settled must be True, False or a diagnostics.Thresholds"):
        chg.check_fit_options(stop_when_settled="yes")


def test_unknown_keywords_and_old_positions(tiny_model):
    d = tiny_data()
    with pytest.raises(TypeError, match=r"fit_chg\(\) got an unexpected keyword argument 'nope'"):
        chg.fit_chg(tiny_model, d, nope=1)
    with pytest.raises(TypeError, match=r"fit_contrastive\(\) got an unexpected keyword argument 'reg_updates'"):
        contrastive.fit_contrastive(tiny_model, d, d, reg_updates=1)
    with pytest.raises(TypeError, match=r"fit_chg\(\) missing a required argument: 'data'"):
        chg.fit_chg(tiny_model)


# ----------------------------------------------------------------------------- the decorator itself
@dataclasses.dataclass
class _Steps(options.OptionSet):
    steps: int = options.option(100, "updates to run")
    rate: float = options.option(0.5, "learning rate")
    derived: str = options.option("x", "set by the set itself", parameter=False)

    def check(self) -> None:
        chg_lens.checks.positive_int("steps", self.steps)


@dataclasses.dataclass
class _Run(options.OptionSet):
    verbose: bool = options.option(False, "say more")


@keyword_only("steps")
@options.takes_options(_Steps, _Run)
def _fit(model, data, config: _Steps, run: _Run):
    """Fit something."""
    return model, data, config, run


def test_takes_options_builds_the_signature_docs_and_checked_sets():
    sig = inspect.signature(_fit)
    assert str(sig) == "(model, data, *, steps: 'int' = 100, rate: 'float' = 0.5, verbose: 'bool' = False)"
    assert _fit.__doc__.startswith("Fit something.") and "- ``steps`` (int, default ``100``): updates to run" in _fit.__doc__
    m, d, cfg, run = _fit("m", "d", steps=3.0, verbose=True)
    assert (m, d, cfg, run) == ("m", "d", _Steps(3, 0.5, "x"), _Run(True)) and type(cfg.steps) is int
    assert type(_fit("m", "d", rate=1)[2].rate) is float
    with pytest.raises(ValueError, match="steps must be at least 1"):
        _fit("m", "d", steps=0)
    with pytest.raises(TypeError, match=r"_fit\(\) got an unexpected keyword argument 'derived'"):
        _fit("m", "d", derived="y")
    with pytest.warns(DeprecationWarning, match="passing steps by position"):
        assert _fit("m", "d", 7)[2].steps == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _fit(data="d", model="m")[:2] == ("m", "d")
    with pytest.raises(TypeError, match="declared by both"):
        options.option_fields(_Steps, _Steps)
    with pytest.raises(ValueError, match=r"f does not take \['nope'\]"):
        options.check_options((_Steps, _Run), {"nope": 1}, "f")


def test_a_cli_flag_needs_a_command_line_form():
    p = argparse.ArgumentParser()
    with pytest.raises(TypeError, match="checkpoint_dir has no command-line form"):
        cli_options.add_option_flags(p, (fitting.RunOptions,), {})
    cli_options.add_option_flags(p, (_Steps, _Run), {"rate": 0.25})
    a = p.parse_args(["--steps", "5", "--verbose"])
    assert (a.steps, a.rate, a.verbose) == (5, 0.25, True)
    assert cli_options.option_values(a, (_Steps, _Run)) == {"steps": 5, "rate": 0.25, "verbose": True}


# ----------------------------------------------------------------------------- one skeleton
def test_both_fits_run_the_one_skeleton(tiny_model, monkeypatch):
    real, calls = fitting.run_fit, []

    def recording(model, config, run, datasets, *a, **k):
        calls.append((type(config).__name__, type(run).__name__, len(datasets)))
        return real(model, config, run, datasets, *a, **k)

    monkeypatch.setattr(fitting, "run_fit", recording)
    monkeypatch.setattr(chg, "run_fit", recording)
    monkeypatch.setattr(contrastive, "run_fit", recording)
    d, v = tiny_data(), tiny_data(6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", chg_lens.diagnostics.NotConvergedWarning)
        r = chg.fit_chg(tiny_model, d, n_seeds=1, updates=2, reg_updates=2, batch_size=4, validation=v, progress=False)
        c = contrastive.fit_contrastive(tiny_model, d, d, updates=2, batch_size=4, validation=(v, v), progress=False)
    assert calls == [("CHGConfig", "CHGRunOptions", 2), ("ContrastiveConfig", "ContrastiveRunOptions", 4)]
    common = {"model", "n_layers", "n_heads", "weights", "versions", "tl_major", "configs_per_pass", "precision",
              "autocast", "seconds", "n_train", "n_validation"}
    assert common <= set(r.meta) and common <= set(c.meta)
    assert r.meta["validation_precision"] == "float32" and len(c.meta["validation_fingerprints"]) == 2


def test_the_convergence_warning_points_at_the_caller(tiny_model):
    d = tiny_data()
    with pytest.warns(chg_lens.diagnostics.NotConvergedWarning) as got:
        chg.fit_chg(tiny_model, d, n_seeds=1, updates=2, reg_updates=2, batch_size=4, progress=False)
        c = contrastive.fit_contrastive(tiny_model, d, d, updates=2, batch_size=4, lr=5.0, progress=False)
    mine = [w for w in got if issubclass(w.category, chg_lens.diagnostics.NotConvergedWarning)]
    assert not c.converged and [os.path.basename(w.filename) for w in mine] == ["test_options.py"] * 2


@pytest.mark.parametrize("name, module", [("chg", chg), ("contrastive", contrastive)])
def test_api_docs_list_every_fit_option_as_declared(name, module):
    # docs/api.md's tables are generated from the option sets (the reference itself reads the source,
    # where the signature is the one before takes_options): regenerate them when an option changes
    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    start, end = f"<!-- options: {name} -->\n", f"<!-- end options: {name} -->"
    assert start in api and end in api, f"docs/api.md has no {start.strip()} ... {end} block"
    shown = api.split(start, 1)[1].split(end, 1)[0]
    want = options.options_table(*module.FIT_OPTIONS)
    assert shown == want, (f"docs/api.md's {name} options table is out of date; put there the output of "
                           f"options.options_table(*chg_lens.{name}.FIT_OPTIONS)")
    rows = want.splitlines()[2:]
    assert len(rows) == len(options.option_fields(*module.FIT_OPTIONS)) and all(r.count("|") == 5 for r in rows)
