"""Slow: on SmolLM2-135M, a short IOI fit at ``autocast="auto"`` finds the same roles as float32
(issue 16). Runs where auto means bf16 (a CPU with AVX512-BF16/AMX, or a CUDA GPU); elsewhere auto
*is* float32 and there is nothing to compare.

Tolerances (measured on a Zen 5 CPU with AVX512-BF16: see the assertion messages): bf16 rounding
moves single gates, most where a head's gradient is near zero and Adam moves it by about the full
learning rate in whichever direction rounding gives; roles, read per head from G+ and G-, agree."""

import pytest

import chg_lens
from chg_lens import models

ROLE_AGREEMENT = 0.9   # share of (seed, layer, head) with the same role
MEAN_GATE_DIFF = 0.05  # mean |gate_auto - gate_fp32| per stage


@pytest.mark.slow
@pytest.mark.hardware_precision
def test_smollm2_auto_precision_fit_finds_the_float32_roles(smollm2):
    if models.resolve_autocast(smollm2, "auto") is None:
        pytest.skip(f"auto is float32 here ({models.describe_precision(smollm2, 'auto')}): nothing to compare")
    train, _ = chg_lens.tasks.ioi(smollm2, n_prompts=64, seed=0)
    kw = dict(n_seeds=2, updates=15, reg_updates=15, batch_size=8, progress=False)
    fast = chg_lens.fit_chg(smollm2, train, **kw)
    plain = chg_lens.fit_chg(smollm2, train, autocast="off", **kw)
    assert fast.meta["autocast"] == "bf16" and plain.meta["autocast"] is None
    diffs = {s: float((fast.gates(s) - plain.gates(s)).abs().mean()) for s in ("g0", "g_plus", "g_minus")}
    maxes = {s: float((fast.gates(s) - plain.gates(s)).abs().max()) for s in ("g0", "g_plus", "g_minus")}
    agree = float((fast.scores()["role"].values == plain.scores()["role"].values).mean())
    print(f"mean |dg| {diffs}, max |dg| {maxes}, role agreement {agree:.3f}")
    assert all(d < MEAN_GATE_DIFF for d in diffs.values()), (diffs, maxes)
    assert agree >= ROLE_AGREEMENT, (agree, diffs, maxes)
