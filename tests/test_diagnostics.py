"""Convergence diagnostics: the pure pieces on hand-made numbers, the known-answer model converging at
a full budget and not at 3 updates (with the warning), stop-when-settled, resume, and the report banner."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch

import chg_lens
from chg_lens import diagnostics as diag
from chg_lens import fit_chg
from chg_lens.diagnostics import NotConvergedWarning, Thresholds
from conftest import die_on_call, known_answer_data

FULL = dict(n_seeds=2, updates=60, reg_updates=60, batch_size=16, progress=False)


# ----------------------------------------------------------------------------------- pure pieces
def test_window_length():
    assert diag.window_length(500) == 50 and diag.window_length(30) == 10 and diag.window_length(3) == 3
    assert diag.window_length(101) == 11 and diag.window_length(200, window=0.25, min_window=1) == 50


def test_gate_movement_counts_gates_over_the_threshold():
    start = torch.zeros(2, 2, 2)
    end = torch.tensor([[[0.0, 0.04], [0.06, 0.5]], [[0.0, 0.0], [0.0, -0.2]]])
    mean_abs, share = diag.gate_movement(start, end, move=0.05)
    torch.testing.assert_close(mean_abs, torch.tensor([0.6 / 4, 0.2 / 4], dtype=torch.float64))
    torch.testing.assert_close(share, torch.tensor([0.5, 0.25], dtype=torch.float64))


def test_nll_slope_and_its_standard_error():
    x = torch.arange(10, dtype=torch.float64)
    trace = torch.stack([2.0 - 0.1 * x, torch.full_like(x, 3.0)], dim=1)
    slope, se = diag.nll_slope(trace)
    torch.testing.assert_close(slope, torch.tensor([-0.1, 0.0], dtype=torch.float64))
    assert float(se.max()) < 1e-12
    noisy = trace[:, :1] + torch.tensor([1.0, -1.0] * 5, dtype=torch.float64)[:, None]
    assert float(diag.nll_slope(noisy)[1]) > 0.05
    assert math.isinf(float(diag.nll_slope(trace[:2])[1][0]))


def test_settled_rule():
    th = Thresholds()
    share = torch.tensor([0.0, 0.2, 0.0, 0.0])
    slope = torch.tensor([-0.01, 0.0, -0.01, 0.01])  # over a window of 10: -0.1, 0, -0.1, +0.1
    se = torch.tensor([0.001, 0.0, 0.02, 0.0])  # seed 2: the fall is within noise
    assert diag.is_settled(share, slope, se, 10, th).tolist() == [False, False, True, True]


def test_advice_tells_a_drift_from_a_noise_walk():
    def frame(stage, nll_change):
        return pd.DataFrame({"stage": [stage], "seed": [0], "updates": [300], "window": [30], "mean_abs_change": [0.03],
                             "share_moving": [0.07], "nll_slope": [nll_change / 30], "nll_change": [nll_change],
                             "settled": [False]})
    drift = diag.advice(frame("g0", -0.4))  # NLL still falling: more updates, not a lower final rate
    assert "g0 not settled in 1 seed(s) (7% of gates moving" in drift and "more updates" in drift
    assert "lower final learning rate" not in drift and "lambda" not in drift
    walk = diag.advice(frame("g_minus", -0.01))  # NLL flat, gates moving: batch noise
    assert "lower final learning rate (lr_end/reg_lr_end" in walk and "more updates" not in walk and "lambda" in walk
    both = diag.advice(pd.concat([frame("g0", -0.4), frame("g_plus", 0.0)]))
    assert "more updates" in both and "lower final learning rate" in both and "lambda" not in both
    short = diag.advice(frame("g_plus", 0.0).assign(updates=4, window=4))  # the whole stage is the window
    assert "more updates" in short and "lower final learning rate" not in short
    assert diag.advice(frame("g0", 0.0).assign(settled=True)) == ""
    lost = frame("g0", 0.0).assign(settled=True, val_logprob=-3.0, val_accuracy=0.2, ungated_logprob=-1.0,
                                   ungated_accuracy=0.8, kept_task=False)
    assert "G0 lost the task in 1 seed(s)" in diag.advice(lost) and "Give G0 more updates" in diag.advice(lost)


def test_seed_agreement_pieces():
    a = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    assert diag.spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert diag.spearman(a, -a) == pytest.approx(-1.0)
    assert diag.mean_pairwise_spearman(torch.cat([a, a, -a])) == pytest.approx((1 - 1 - 1) / 3)
    assert math.isnan(diag.mean_pairwise_spearman(a))
    labels = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 0], [0, 2, 2, 2]])
    assert diag.same_in_every_seed(labels) == pytest.approx(0.5)


def test_unknown_or_bad_thresholds_are_errors():
    with pytest.raises(TypeError, match="unknown diagnostic threshold"):
        Thresholds.of(moves=0.1)
    with pytest.raises(ValueError, match="window"):
        Thresholds.of(window=0.0)


# ----------------------------------------------------------------------------------- known answer
@pytest.fixture(scope="module")
def data():
    return known_answer_data(64), known_answer_data(32, seed=1)


@pytest.fixture(scope="module")
def full_fit(known_model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)  # a converged fit does not warn
        return fit_chg(known_model, data[0], validation=data[1], **FULL)


def test_known_answer_fit_converges(full_fit):
    d = full_fit.diagnostics()
    assert full_fit.converged and d.attrs["converged"]
    assert list(d.stage) == ["g0", "g0", "g_plus", "g_plus", "g_minus", "g_minus"] and list(d.seed) == [0, 1] * 3
    assert (d.window == 10).all() and (d.updates == 60).all() and d.settled.all()
    assert (d.share_moving <= 0.05).all()
    g0 = d[d.stage == "g0"]
    assert g0.kept_task.all() and (g0.val_accuracy == 1.0).all() and (g0.val_logprob > g0.ungated_logprob).all()
    assert d[d.stage != "g0"].kept_task.isna().all()
    assert d.attrs["role_agreement"] == 1.0  # the designed roles in both seeds
    assert set(d.attrs) >= {"spearman_g_plus", "spearman_g_minus"}
    # the window's start is a kept snapshot, so the movement is the one over the last 10 updates exactly
    assert 50 in full_fit.snapshot_steps["g0"].tolist()
    steps = full_fit.snapshot_steps["g0"].tolist()
    want = (full_fit.g0 - full_fit.snapshots["g0"][steps.index(50)]).abs().flatten(1).mean(1)
    torch.testing.assert_close(torch.tensor(g0.mean_abs_change.to_numpy()), want.double())
    s = full_fit.summary()
    assert "converged: yes" in s and "seed agreement: role_agreement 1.000" in s and "WARNING" not in s
    assert full_fit.convergence_warning() == ""


def test_stricter_thresholds_can_fail_the_same_fit(full_fit):
    d = full_fit.diagnostics(move=0.0, max_moving=0.0)  # any movement at all
    assert not d.attrs["converged"] and not d.settled.any()
    lost = full_fit.diagnostics(g0_logprob_tol=-10.0)  # G0 must beat the ungated model by 10 nats
    assert not lost.attrs["converged"] and not lost[lost.stage == "g0"].kept_task.any()


def test_three_updates_do_not_converge_and_warn(known_model, data):
    with pytest.warns(NotConvergedWarning, match="did not converge.*more updates") as caught:
        r = fit_chg(known_model, data[0], validation=data[1], **{**FULL, "updates": 3, "reg_updates": 3})
    assert len(caught) == 1 and "\n" not in str(caught[0].message)  # one line
    assert not r.converged
    d = r.diagnostics()
    assert (d.window == 3).all() and not d[d.stage == "g_plus"].settled.any()
    s = r.summary()
    assert "converged: NO" in s and s.splitlines()[-1].startswith("  WARNING: CHG fit did not converge")


def test_stop_when_settled_stops_early_with_the_same_roles(known_model, data, full_fit):
    r = fit_chg(known_model, data[0], validation=data[1], stop_when_settled=True, **{**FULL, "updates": 200,
                                                                                   "reg_updates": 200})
    taken = r.updates_taken()
    assert taken == r.meta["updates_taken"] and taken["g_plus"] == taken["g_minus"]
    assert all(n < 200 for n in taken.values()), taken
    assert r.traces["g0"]["nll"].shape[0] == taken["g0"] and int(r.snapshot_steps["g0"][-1]) == taken["g0"]
    assert r.converged  # it stopped because the diagnostics passed
    assert r.config["stop_when_settled"] is True
    assert r.scores().role.tolist() == full_fit.scores().role.tolist()
    traj = r.trajectories()
    assert traj.loc[traj.stage == "g_plus", "update"].max() == taken["g0"] + taken["g_plus"]
    # the full schedule is the default and runs every update
    assert full_fit.updates_taken() == {"g0": 60, "g_plus": 60, "g_minus": 60}


def test_stop_when_settled_resumes_from_a_checkpoint(tiny_model, tmp_path, monkeypatch):
    data = chg_lens.TaskDataset.from_tokens(torch.randint(4, 30, (10, 6)), torch.arange(6).expand(10, 6) >= 4)
    th = Thresholds(min_window=3, max_moving=1.0, max_nll_drop=10.0)  # settles as soon as it has a window
    kw = dict(n_seeds=2, updates=8, reg_updates=8, batch_size=4, progress=False, stop_when_settled=th)
    whole = fit_chg(tiny_model, data, **kw)
    assert whole.updates_taken()["g0"] == 3

    import chg_lens.fitting as fitting

    with monkeypatch.context() as m:
        die_on_call(m, fitting, "batch_rows", 6, KeyboardInterrupt)  # G+/G- update 2, after a checkpoint there
        with pytest.raises(KeyboardInterrupt):
            fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    meta = fitting.checkpoint_meta(tmp_path / "ck")
    assert meta["stage"] == "g_pm" and meta["step"] == 2
    resumed = fit_chg(tiny_model, data, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **kw)
    assert resumed.updates_taken() == whole.updates_taken()
    for k in whole.logits:
        torch.testing.assert_close(resumed.logits[k], whole.logits[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.snapshots[k], whole.snapshots[k], rtol=0, atol=1e-6)
    assert resumed.diagnostics(min_window=3).equals(whole.diagnostics(min_window=3))


def test_diagnostics_survive_save_and_load(full_fit, tmp_path):
    back = chg_lens.CHGResult.load(full_fit.save(tmp_path / "run"))
    pd.testing.assert_frame_equal(back.diagnostics(), full_fit.diagnostics())
    assert back.converged


def test_bad_stop_when_settled_is_an_error(known_model, data):
    with pytest.raises(TypeError, match="stop_when_settled"):
        fit_chg(known_model, data[0], stop_when_settled="yes", progress=False)
