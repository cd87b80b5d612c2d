"""CPU sharing (issue 28): load-aware thread counts in fits and scoring passes, no wait-policy change."""

import os
import subprocess
import sys

import pytest
import torch

from chg_lens import runtime


def test_importing_chg_lens_leaves_the_wait_policy_alone():
    # PASSIVE made a quiet fit 1.2-1.5x slower (benchmarks/README.md): chg_lens must not set it
    code = "import os, chg_lens, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-500:]


def _loaded_machine(monkeypatch, others: float):
    """Every look at /proc/stat finds ``others`` cores busy with other processes, 10 s after the last."""
    clock = {"t": 0.0, "busy": 0.0}

    def monotonic():
        clock["t"] += 10.0
        clock["busy"] += 10.0 * others
        return clock["t"]

    monkeypatch.setattr(runtime, "cores", lambda: [0, 1])
    monkeypatch.setattr(runtime, "busy_seconds", lambda cpus, nice=True: clock["busy"])
    monkeypatch.setattr(runtime, "own_seconds", lambda: 0.0)
    monkeypatch.setattr(runtime.time, "monotonic", monotonic)


@pytest.mark.parametrize("others, want", [(0.0, 2), (1.0, 1)])
def test_scoring_passes_follow_the_load_and_restore_the_threads(tiny_model, monkeypatch, others, want):
    from chg_lens import scoring
    from chg_lens.data import TaskDataset

    _loaded_machine(monkeypatch, others)
    tokens = torch.randint(4, 30, (6, 5))
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, -1] = True
    data = TaskDataset.from_tokens(tokens, mask, pad_token_id=3)
    seen = []

    def counting(fn):
        def run(*args, **kwargs):
            seen.append((fn.__name__, torch.get_num_threads()))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(scoring, "row_logprobs_unchecked", counting(scoring.row_logprobs_unchecked))
    monkeypatch.setattr(scoring.models, "cache_z", counting(scoring.models.cache_z))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        exact = scoring.evaluate(tiny_model, data, batch_size=2)
        scoring.collect_z(tiny_model, data, mean=True, batch_size=2)
        scoring.gate_gradients(tiny_model, data, lambda s: s.logprob_sum, batch_size=2)
        assert {name for name, _ in seen} == {"row_logprobs_unchecked", "cache_z"}
        assert {n for _, n in seen} == {want}              # every pass ran on the cores left free
        assert torch.get_num_threads() == 2                # and the caller's count is back
    finally:
        torch.set_num_threads(before)
    monkeypatch.undo()
    # the same numbers as at a fixed thread count, to rounding (the order of a sum may differ)
    assert torch.allclose(scoring.evaluate(tiny_model, data, batch_size=2).logprob_sum, exact.logprob_sum, atol=1e-6)


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
    stat.write_text("cpu0 300 700 50 2000 20 0 0 0 0 0\n")  # 700 ticks of niced (background) processes
    assert runtime.busy_seconds([0], str(stat)) == pytest.approx(1050 / tick)
    assert runtime.busy_seconds([0], str(stat), nice=False) == pytest.approx(350 / tick)


def test_load_aware_threads_follow_the_load_and_restore_the_callers_count(monkeypatch):
    clock = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(runtime, "cores", lambda: [0, 1])
    monkeypatch.setattr(runtime, "busy_seconds", lambda cpus, nice=True: clock["busy"])
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
