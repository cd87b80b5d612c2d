"""CPU sharing (issue 28): the passive OpenMP wait policy and load-aware thread counts."""

import subprocess
import sys

import pytest
import torch

from chg_lens import runtime


def test_passive_wait_is_set_only_before_torch_and_only_when_unset():
    env, mods = {}, {}
    assert runtime.prefer_passive_wait(env, mods) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not runtime.prefer_passive_wait(env, mods) and env["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice
    env = {}
    assert not runtime.prefer_passive_wait(env, {"torch": object()}) and env == {}  # too late: OpenMP read it


def test_importing_chg_lens_first_makes_the_cli_passive():
    code = "import os, chg_lens, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "PASSIVE", out.stderr[-500:]
    out = subprocess.run([sys.executable, "-c", "import torch, os, chg_lens; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "None"  # torch first: nothing changed behind the user's back


@pytest.mark.parametrize("cores, others, most, want", [
    (2, 0.0, 2, 2), (2, 0.4, 2, 2), (2, 0.6, 2, 1), (2, 1.0, 2, 1), (2, 2.0, 2, 1), (8, 3.0, 8, 5), (8, 0.0, 4, 4)])
def test_threads_are_the_cores_left_free(cores, others, most, want):
    assert runtime.threads_for(cores, others, most) == want


def test_busy_seconds_reads_only_our_cores(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (ticks)
    stat.write_text("cpu  900 0 100 5000 50 0 0 0 0 0\ncpu0 300 0 50 2000 20 0 0 0 0 0\n"
                    "cpu1 600 0 50 3000 30 0 0 0 0 0\nintr 1 2 3\n")
    tick = __import__("os").sysconf("SC_CLK_TCK")
    assert runtime.busy_seconds([0], str(stat)) == pytest.approx(350 / tick)
    assert runtime.busy_seconds([0, 1], str(stat)) == pytest.approx(1000 / tick)
    assert runtime.busy_seconds([5], str(stat)) is None
    assert runtime.busy_seconds([0], str(tmp_path / "missing")) is None


def test_load_aware_threads_follow_the_load_and_restore_the_callers_count(monkeypatch):
    clock = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(runtime, "cores", lambda: [0, 1])
    monkeypatch.setattr(runtime, "busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(runtime, "own_seconds", lambda: clock["own"])
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock["t"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with runtime.LoadAwareThreads(every=1.0, enabled=True) as t:
            def tick(seconds, own, others):
                clock["t"] += seconds
                clock["own"] += own * seconds
                clock["busy"] += (own + others) * seconds
                return t.adapt()

            assert tick(0.5, 2.0, 0.0) == 2          # too soon to judge: unchanged
            assert tick(1.0, 2.0, 0.0) == 2          # quiet
            assert tick(2.0, 1.0, 1.0) == 1          # another process holds a core
            assert torch.get_num_threads() == 1
            assert tick(2.0, 1.0, 2.0) == 1          # never below 1
            assert tick(2.0, 1.0, 0.0) == 2          # the load went away
            assert [w for _, w in t.history] == [1, 2]
            tick(2.0, 1.0, 1.0)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2          # restored at exit
    finally:
        torch.set_num_threads(before)


def test_fixed_threads_are_left_alone(monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, "fixed")
    with runtime.LoadAwareThreads() as t:
        assert not t.enabled and t.adapt() == torch.get_num_threads()
