"""Slow: the real Gemma-3-270m (offline GGUF, alias ``gemma-3-270m``, TransformerLens 4): it loads,
scores through the one output path, solves IOI, fits, and its CHG score distributions compare with
SmolLM2's (the paper's cross-model consistency, Sec. 4.2)."""

import pytest
import torch

import chg_lens
from chg_lens import models, taxonomy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if models.TL_MAJOR < 4:
        with pytest.raises(ValueError, match="needs TransformerLens 4"):
            chg_lens.load_model("gemma-3-270m")
        pytest.skip("gemma-3-270m needs TransformerLens 4")
    try:
        models.gemma3_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return chg_lens.load_model("gemma-3-270m")


def test_gemma3_loads_and_scores_through_the_one_output_path(gemma3):
    assert (models.n_layers(gemma3), models.n_heads(gemma3), models.d_head(gemma3)) == (18, 4, 256)
    assert models.readout_is_exact(gemma3)
    toks = gemma3.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    resid = models.final_residual(gemma3, toks)
    torch.testing.assert_close(models.unembed(gemma3, resid[:, -1]), gemma3(toks)[:, -1], rtol=1e-4, atol=1e-4)


def test_gemma3_solves_ioi_and_a_short_fit_runs(gemma3, smollm2):
    train, val = chg_lens.tasks.ioi(gemma3, n_prompts=80, seed=0)
    acc = float(chg_lens.evaluate(gemma3, val).correct.float().mean())
    print(f"Gemma-3-270m IOI validation accuracy ({len(val)} prompts): {acc:.3f}")
    assert acc >= 0.6
    kw = dict(n_seeds=1, updates=4, reg_updates=2, batch_size=4, progress=False)
    g = chg_lens.fit_chg(gemma3, train.subset(list(range(16))), task="ioi", **kw)
    assert g.g0.shape == (1, 18, 4) and torch.isfinite(g.logits["g_plus"]).all()
    s_train, _ = chg_lens.tasks.ioi(smollm2, n_prompts=24, seed=0)
    s = chg_lens.fit_chg(smollm2, s_train.subset(list(range(16))), task="ioi", **kw)
    import pandas as pd

    frame = pd.concat([g.scores(), s.scores()], ignore_index=True)
    consistency = taxonomy.cross_model_consistency(frame)
    assert len(consistency) == 3 and set(consistency["score"]) == set(taxonomy.SCORES)
    assert consistency["pearson"].between(-1, 1).all()
    print(consistency.to_string(index=False))
