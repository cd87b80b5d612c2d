"""The gate mechanism: identity, ablation, per-row and per-block configurations, mixing a source."""

import pytest
import torch

from chg_lens import gates, models
from chg_lens.scoring import row_logprobs


def _tokens(model, rows=3, pos=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.cfg.d_vocab, (rows, pos), generator=g)


def test_gate_one_everywhere_reproduces_ungated_logits_exactly(tiny_model):
    toks = _tokens(tiny_model)
    plain = tiny_model(toks)
    ones = gates.ones(tiny_model)
    gated = models.run_with_hooks(tiny_model, toks, gates.gate_hooks(tiny_model, ones, skip_identity=False))
    assert len(gates.gate_hooks(tiny_model, ones, skip_identity=False)) == models.n_layers(tiny_model)
    assert torch.equal(plain, gated)


def test_final_residual_and_unembed_equal_full_logits(tiny_model):
    toks = _tokens(tiny_model)
    resid = models.final_residual(tiny_model, toks)
    assert resid.shape == (3, 6, tiny_model.cfg.d_model)
    torch.testing.assert_close(models.unembed(tiny_model, resid[:, [1, 4]]), tiny_model(toks)[:, [1, 4]], rtol=1e-5, atol=1e-5)


def test_gate_zero_equals_zero_ablating_that_heads_z(tiny_model):
    toks = _tokens(tiny_model)
    g = gates.ones(tiny_model)
    g[1, 2] = 0.0

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    manual = models.run_with_hooks(tiny_model, toks, [(models.z_hook_name(1), zero_head)])
    gated = models.run_with_hooks(tiny_model, toks, gates.gate_hooks(tiny_model, g))
    assert torch.equal(manual, gated)
    assert not torch.allclose(gated, tiny_model(toks))  # the head mattered


def test_hook_z_has_query_heads_under_grouped_query_attention(tiny_model):
    seen = {}

    def grab(z, hook):
        seen["z"] = z.shape

    models.run_with_hooks(tiny_model, _tokens(tiny_model), [(models.z_hook_name(0), grab)])
    assert seen["z"] == (3, 6, 4, 8)  # 4 query heads although only 2 key-value heads
    assert models.z_hook_name(3) == "blocks.3.attn.hook_z"


def test_per_row_gates_equal_running_each_configuration_separately(tiny_model):
    toks = _tokens(tiny_model, rows=4)
    cfg = torch.rand(4, 2, 4, generator=torch.Generator().manual_seed(1))
    together = models.run_with_hooks(tiny_model, toks, gates.gate_hooks(tiny_model, cfg))
    for i in range(4):
        alone = models.run_with_hooks(tiny_model, toks[i : i + 1], gates.gate_hooks(tiny_model, cfg[i]))
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_config_blocks_equal_separate_runs_in_row_logprobs(tiny_model):
    toks = _tokens(tiny_model, rows=3)
    mask = torch.zeros_like(toks, dtype=torch.bool)
    mask[:, 3:] = True
    cfg = torch.rand(5, 2, 4, generator=torch.Generator().manual_seed(2))
    together = row_logprobs(tiny_model, toks, mask, cfg)
    for k in range(5):
        alone = row_logprobs(tiny_model, toks, mask, cfg[k])
        torch.testing.assert_close(together.logprob_sum[k], alone.logprob_sum[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(together.correct[k], alone.correct[0])


def test_row_logprobs_match_log_softmax_of_full_logits(tiny_model):
    toks = _tokens(tiny_model, rows=2, pos=5)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    lp = tiny_model(toks).log_softmax(-1)
    want = torch.stack([lp[0, 1, toks[0, 2]] + lp[0, 2, toks[0, 3]], lp[1, 3, toks[1, 4]]])
    got = row_logprobs(tiny_model, toks, mask)
    torch.testing.assert_close(got.logprob_sum[0], want, rtol=1e-5, atol=1e-5)
    assert got.n_targets.tolist() == [2, 1]


def test_source_mixing_and_positions(tiny_model):
    toks = _tokens(tiny_model, rows=2)
    other = torch.randn(2, 6, 4, 8)
    seen = {}
    g = gates.ones(tiny_model)
    g[0, 1] = 0.25
    pos = torch.zeros(2, 6, dtype=torch.bool)
    pos[:, -1] = True

    def grab(z, hook):
        seen["z"] = z.detach().clone()

    base = {}

    def grab_base(z, hook):
        base["z"] = z.detach().clone()

    models.run_with_hooks(tiny_model, toks, [(models.z_hook_name(0), grab_base)])
    models.run_with_hooks(tiny_model, toks, gates.gate_hooks(tiny_model, g, {0: other}, pos) + [(models.z_hook_name(0), grab)])
    z0, z = base["z"], seen["z"]
    torch.testing.assert_close(z[:, -1, 1], 0.25 * z0[:, -1, 1] + 0.75 * other[:, -1, 1])
    assert torch.equal(z[:, :-1], z0[:, :-1])  # other positions untouched
    assert torch.equal(z[:, :, [0, 2, 3]], z0[:, :, [0, 2, 3]])  # gate 1 heads untouched


def test_bad_gate_shape_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"n_layers, n_heads"):
        gates.gate_hooks(tiny_model, torch.ones(3, 4))


def test_single_head_configs(tiny_model):
    cfg = gates.single_head_configs(tiny_model)
    assert cfg.shape == (8, 2, 4)
    assert (cfg == 0).sum() == 8 and cfg[5, 1, 1] == 0
