"""CHG fitting: the known-answer model, exact reloads, resume, batching levers, and bad input."""

import json

import pytest
import torch

import chg_lens
from chg_lens import CHGResult, fit_chg
from chg_lens.scoring import evaluate

from conftest import die_on_call, known_answer_data

FAST = dict(n_seeds=2, updates=60, reg_updates=60, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def known_fit(known_model):
    data = known_answer_data(64)
    val = known_answer_data(32, seed=1)
    return fit_chg(known_model, data, validation=val, **FAST)


def test_known_answer_model_heads_get_their_roles(known_fit):
    s = known_fit.scores()
    role = s.groupby("head")["role"].agg(lambda r: r.mode()[0])
    assert role.tolist() == ["facilitating", "interfering", "irrelevant", "irrelevant"]
    every_seed = s.pivot_table(index="seed", columns="head", values=["facilitation", "interference", "irrelevance"])
    assert (every_seed["facilitation"][0] > 0.9).all()          # G- keeps the answer-copying head
    assert (every_seed["interference"][1] > 0.8).all()          # G+ drops the distractor head
    assert (every_seed["irrelevance"][[2, 3]] > 0.9).all().all()  # no effect: G+ -> 1, G- -> 0
    assert known_fit.g_plus.shape == (2, 1, 4)


def test_validation_reports_that_the_fit_kept_the_task(known_fit):
    v = known_fit.validation.groupby("gates")[["logprob", "accuracy"]].mean()
    assert v.loc["g0", "logprob"] > v.loc["none", "logprob"] + 0.3  # dropping the distractor head helps
    assert v.loc["g_minus", "accuracy"] == 1.0
    assert set(known_fit.validation["gates"]) == {"none", "g0", "g_plus", "g_minus"}


def test_traces_and_snapshots(known_fit):
    assert known_fit.traces["g0"]["nll"].shape == (60, 2)
    assert known_fit.traces["g0"]["nll"][-1].mean() < known_fit.traces["g0"]["nll"][0].mean()
    assert known_fit.traces["g_plus"]["reg"].shape == (60, 2)
    assert known_fit.snapshot_steps["g0"].tolist() == [0, 10, 20, 30, 40, 50, 60]
    torch.testing.assert_close(known_fit.snapshots["g_minus"][-1], known_fit.g_minus)
    traj = known_fit.trajectories()
    assert traj["update"].max() == 120 and set(traj["stage"]) == {"g0", "g_plus", "g_minus"}


def test_save_load_round_trip_is_exact(known_fit, tmp_path):
    path = known_fit.save(tmp_path / "run")
    back = CHGResult.load(path)
    for k in known_fit.logits:
        assert torch.equal(back.logits[k], known_fit.logits[k])
        assert torch.equal(back.snapshots[k], known_fit.snapshots[k])
        for name in known_fit.traces[k]:
            assert torch.equal(back.traces[k][name], known_fit.traces[k][name])
    assert back.config == known_fit.config and back.meta == known_fit.meta
    assert back.scores().equals(known_fit.scores())
    assert back.validation.equals(known_fit.validation)
    assert (path / "scores.csv").read_text().startswith("model,task,seed,layer,head")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["lam"] == 0.1 and "torch" in meta["meta"]["versions"]
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in path.iterdir())


def test_fit_is_deterministic_and_seeded(known_model):
    data = known_answer_data(32)
    a = fit_chg(known_model, data, n_seeds=2, updates=5, reg_updates=5, batch_size=8, progress=False)
    b = fit_chg(known_model, data, n_seeds=2, updates=5, reg_updates=5, batch_size=8, progress=False)
    c = fit_chg(known_model, data, n_seeds=2, updates=5, reg_updates=5, batch_size=8, seed=1, progress=False)
    assert all(torch.equal(a.logits[k], b.logits[k]) for k in a.logits)
    assert not torch.equal(a.logits["g0"], c.logits["g0"])


def test_no_gradient_reaches_model_weights(tiny_model):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (8, 6)), torch.arange(6).expand(8, 6) >= 4)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    before = [p.detach().clone() for p in tiny_model.parameters()]
    fit_chg(tiny_model, data, n_seeds=1, updates=2, reg_updates=2, batch_size=4, progress=False)
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(tiny_model.parameters(), before))


def test_joint_and_separate_regularised_stages_agree(tiny_model):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (12, 7)), torch.arange(7).expand(12, 7) >= 5)
    kw = dict(n_seeds=2, updates=4, reg_updates=6, batch_size=6, progress=False)
    joint = fit_chg(tiny_model, data, joint=True, **kw)
    separate = fit_chg(tiny_model, data, joint=False, **kw)
    for k in ("g0", "g_plus", "g_minus"):
        torch.testing.assert_close(joint.logits[k], separate.logits[k], rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tiny_model):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (12, 7)), torch.arange(7).expand(12, 7) >= 4)
    kw = dict(n_seeds=2, updates=3, reg_updates=3, batch_size=8, progress=False)
    full = fit_chg(tiny_model, data, grad_accum=1, **kw)
    accum = fit_chg(tiny_model, data, grad_accum=4, **kw)
    for k in full.logits:
        torch.testing.assert_close(full.logits[k], accum.logits[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("configs_per_pass", [1, 4])
def test_configs_per_pass_gives_the_same_fit(tiny_model, configs_per_pass, monkeypatch):
    # 3 seeds: G0 passes of 3 configurations, joint G+/G- passes of 6; groups of 4 are uneven
    from chg_lens import scoring as chg_module  # the fit's loss runs the unchecked engine

    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (12, 7)), torch.arange(7).expand(12, 7) >= 4)
    kw = dict(n_seeds=3, updates=3, reg_updates=3, batch_size=8, grad_accum=2, progress=False)
    whole = fit_chg(tiny_model, data, **kw)
    real, sizes = chg_module.row_logprobs_unchecked, []

    def recording(ctx, tokens, mask, gates, **kwargs):
        sizes.append(gates.shape[0])
        return real(ctx, tokens, mask, gates, **kwargs)

    monkeypatch.setattr(chg_module, "row_logprobs_unchecked", recording)
    grouped = fit_chg(tiny_model, data, configs_per_pass=configs_per_pass, **kw)
    expected = {1: {1}, 4: {3, 4, 2}}[configs_per_pass]  # G0: 3 (or 1s); G+/G-: 4 + 2 (or 1s)
    assert set(sizes) == expected and grouped.meta["configs_per_pass"] == configs_per_pass
    assert not torch.equal(whole.logits["g_plus"], whole.logits["g_minus"])
    for k in whole.logits:
        torch.testing.assert_close(grouped.logits[k], whole.logits[k], rtol=1e-4, atol=1e-5)
        for name in whole.traces[k]:
            torch.testing.assert_close(grouped.traces[k][name], whole.traces[k][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_configs_per_pass_must_be_a_positive_int(tiny_model, bad):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (4, 7)), torch.arange(7).expand(4, 7) >= 4)
    with pytest.raises(ValueError, match="configs_per_pass"):
        fit_chg(tiny_model, data, configs_per_pass=bad, progress=False)


def test_checkpoint_resume_gives_the_same_result(tiny_model, tmp_path, monkeypatch):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (10, 6)), torch.arange(6).expand(10, 6) >= 4)
    kw = dict(n_seeds=2, updates=6, reg_updates=6, batch_size=4, progress=False)
    whole = fit_chg(tiny_model, data, **kw)

    import chg_lens.fitting as fitting

    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 9, KeyboardInterrupt)  # G+/G-, after a checkpoint at its update 2
        with pytest.raises(KeyboardInterrupt):
            fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    meta = fitting.checkpoint_meta(tmp_path / "ck")
    assert meta["stage"] == "g_pm" and meta["step"] == 2
    resumed = fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    for k in whole.logits:
        torch.testing.assert_close(resumed.logits[k], whole.logits[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.traces[k]["nll"], whole.traces[k]["nll"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "ck", **{**kw, "lam": 0.2})


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_seeds=0), "n_seeds"), (dict(batch_size=0), "batch_size"), (dict(lam=-0.1), "lam must be >= 0"),
])
def test_bad_options_fail_before_any_work(tiny_model, kwargs, match):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (4, 6)), torch.arange(6).expand(4, 6) >= 4)
    with pytest.raises(ValueError, match=match):
        fit_chg(tiny_model, data, **kwargs)


def test_data_that_does_not_fit_the_model_fails_before_any_work(tiny_model):
    big = chg_lens.TaskDataset.from_tokens(torch.full((2, 4), 500), torch.arange(4).expand(2, 4) >= 2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        fit_chg(tiny_model, big, progress=False)
    with pytest.raises(TypeError, match="TaskDataset"):
        fit_chg(tiny_model, (big, big))


def test_evaluate_batches_configs_like_single_runs(known_model):
    data = known_answer_data(10)
    cfg = torch.ones(3, 1, 4)
    cfg[1, 0, 0] = 0
    cfg[2, 0, 1] = 0
    many = evaluate(known_model, data, cfg, batch_size=4, rows_per_pass=8)
    for k in range(3):
        one = evaluate(known_model, data, cfg[k])
        torch.testing.assert_close(many.logprob_sum[k], one.logprob_sum[0], rtol=1e-5, atol=1e-5)
    acc = many.correct.float().mean(1)
    assert acc[1] < 0.2 and acc[2] == 1.0  # without the answer head it fails; without the distractor it is perfect


def test_gates_is_a_read_only_mapping_by_stage_and_the_old_call_warns(known_fit):
    gates = known_fit.gates
    assert list(gates) == ["g0", "g_plus", "g_minus"] and len(gates) == 3 and "g_plus" in gates
    for stage, want in (("g0", known_fit.g0), ("g_plus", known_fit.g_plus), ("g_minus", known_fit.g_minus)):
        assert gates[stage].shape == (2, 1, 4)
        assert torch.equal(gates[stage], want)
        assert torch.equal(gates[stage], torch.sigmoid(known_fit.logits[stage]))
    assert {k: tuple(v.shape) for k, v in gates.items()} == {s: (2, 1, 4) for s in ("g0", "g_plus", "g_minus")}
    with pytest.raises(KeyError, match="no stage 'g1'; the stages are 'g0', 'g_plus', 'g_minus'"):
        gates["g1"]
    with pytest.raises(TypeError):
        gates["g0"] = torch.zeros(2, 1, 4)
    gates["g0"].zero_()  # a fresh tensor each time: the result is unchanged
    assert torch.equal(known_fit.gates["g0"], known_fit.g0) and known_fit.g0.min() > 0
    with pytest.warns(DeprecationWarning, match=r"result.gates\('g_minus'\) is now result.gates\['g_minus'\]"):
        old = known_fit.gates("g_minus")
    assert torch.equal(old, known_fit.g_minus)
