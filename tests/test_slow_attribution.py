"""Slow: attribution patching next to activation patching on the real SmolLM2-135M-Instruct with IOI
(16 ABC-corrupted prompts; patching on the 27 heads of layers 27-29, attribution on all 270 heads in
one forward + backward per batch). The measured numbers are in the assertions' comments."""

import pytest
from scipy import stats

import chg_lens
from chg_lens import patching

pytestmark = pytest.mark.slow

HEADS = [(l, h) for l in range(27, 30) for h in range(9)]


def test_smollm2_ioi_attribution_tracks_patching(smollm2):
    clean, corrupted = chg_lens.tasks.ioi_pairs(smollm2, n_prompts=16, seed=0)
    atp = chg_lens.attribute_heads(smollm2, clean, corrupted, batch_size=8)
    pat = patching.patch_heads(smollm2, clean, corrupted, heads=HEADS, batch_size=16)
    f = pat.frame.merge(atp.frame, on=["layer", "head"], suffixes=("_patch", "_atp"))
    rho = stats.spearmanr(f["effect_patch"], f["effect_atp"]).statistic
    r = stats.pearsonr(f["effect_patch"], f["effect_atp"]).statistic
    print(pat.baseline, atp.baseline)
    print(f.nlargest(8, "effect_patch")[["layer", "head", "effect_patch", "effect_atp"]])
    print(f"Spearman {rho:.3f}, Pearson {r:.3f}")
    assert atp.per_prompt.shape == (270, 16)
    assert atp.baseline["corrupted"] == pytest.approx(pat.baseline["corrupted"], abs=1e-3)
    top = f.loc[f["effect_patch"].idxmax()]
    assert (int(top["layer"]), int(top["head"])) == tuple(atp.frame.loc[atp.frame["effect"].idxmax(), ["layer", "head"]])
    assert rho > 0.3
