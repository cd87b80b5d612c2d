"""Precision follows the hardware (issue 16): ``autocast="auto"`` and casting frozen weights once.

* ``auto`` resolves to bf16 on CUDA devices with native bf16 (compute capability >= 8.0) and on CPUs
  with native bf16 (AVX512-BF16 or AMX-BF16 in the flags, or torch's own check), to float32 elsewhere
  and for a model already in bf16/fp16: tested with mocked flags and devices.
* ``auto`` and float32 give the same roles on the known-answer model, gates within 0.1.
* :func:`chg_lens.models.cast_weights_once` gives bit-for-bit the results of plain autocast (which
  re-casts every weight on every op), and leaves the user's weights bit-for-bit as they were, also
  when the block raises.
"""

import contextlib

import pytest
import torch

from chg_lens import fit_chg, gates, models
from chg_lens.ablation import head_sweep
from chg_lens.scoring import score_configs
from chg_lens.data import TaskDataset
from chg_lens.scoring import row_logprobs

from conftest import WORDS, known_answer_data, tiny_llama_hf, word_tokenizer

TOL_GATES = 0.1  # bf16 vs float32 gates after a short fit on the known-answer model

hardware = pytest.mark.hardware_precision


def _batch(model, rows=4, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, model.cfg.d_vocab, (rows, pos), generator=g)
    mask = torch.zeros_like(toks, dtype=torch.bool)
    mask[:, 3:] = True
    return toks, mask


def _cpu(monkeypatch, flags=(), torch_check=False, speedup=2.0):
    """A CPU with these flags whose bf16 matrix products run ``speedup`` times float32's speed."""
    monkeypatch.setattr(models.precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(models.precision, "_torch_cpu_bf16", lambda: torch_check)
    monkeypatch.setattr(models.precision, "cpu_bf16_speedup", lambda: speedup)


# ----------------------------------------------------------------------------- the choice
@hardware
@pytest.mark.parametrize("speedup, want", [(2.3, "bf16"), (1.3, "bf16"), (1.1, None), (0.61, None)])
def test_auto_on_a_native_bf16_cpu_takes_bf16_only_where_it_measured_faster(tiny_model, monkeypatch, speedup, want):
    _cpu(monkeypatch, ("avx512f", "avx512_bf16"), speedup=speedup)
    assert models.resolve_autocast(tiny_model) == want
    text = models.describe_precision(tiny_model, "auto")
    assert f"{speedup:.2f}x float32's speed" in text
    assert text.startswith("bf16 autocast" if want else "float32")


def test_the_bf16_probe_measures_once_per_thread_count(monkeypatch):
    calls = []
    real = models._matmul_seconds
    monkeypatch.setattr(models.precision, "_matmul_seconds", lambda dtype, **kw: calls.append(dtype) or real(dtype, reps=1))
    models._bf16_speedup.cache_clear()
    try:
        first = models.cpu_bf16_speedup()
        assert 0 < first < float("inf") and calls.count(torch.float32) == calls.count(torch.bfloat16) == 3
        assert models.cpu_bf16_speedup() == first and len(calls) == 6  # cached
    finally:
        models._bf16_speedup.cache_clear()


def test_an_emulated_bf16_cpu_is_never_measured(tiny_model, monkeypatch):
    _cpu(monkeypatch, ("avx2", "avx512f"))
    monkeypatch.setattr(models.precision, "cpu_bf16_speedup", lambda: pytest.fail("measured bf16 without native bf16"))
    assert models.resolve_autocast(tiny_model) is None and not models.cpu_bf16_pays()


@hardware
@pytest.mark.parametrize("flags, torch_check, want", [
    (("avx2", "avx512f"), False, None),            # AVX-512 without BF16: bf16 is emulated, slow
    (("avx2", "avx512f", "avx512_bf16"), False, "bf16"),
    (("amx_bf16", "amx_tile"), False, "bf16"),
    ((), True, "bf16"),                            # torch's own check (no /proc/cpuinfo, e.g. not Linux)
    ((), False, None),
])
def test_auto_on_cpu_follows_native_bf16(tiny_model, monkeypatch, flags, torch_check, want):
    _cpu(monkeypatch, flags, torch_check)
    assert models.resolve_autocast(tiny_model, "auto") == want
    assert models.resolve_autocast(tiny_model) == want  # "auto" is the default
    assert models.precision_meta(tiny_model, "auto")["autocast"] == want
    text = models.describe_precision(tiny_model, "auto")
    assert ("bf16 autocast" in text) == (want == "bf16") and "cpu" in text


@hardware
@pytest.mark.parametrize("capability, want", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), None)])
def test_auto_on_cuda_follows_compute_capability(tiny_model, monkeypatch, capability, want):
    _cpu(monkeypatch)  # the CPU's answer must not leak into a CUDA model's
    monkeypatch.setattr(models.precision, "device", lambda model: torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    assert models.resolve_autocast(tiny_model, "auto") == want


@hardware
def test_auto_is_off_for_low_precision_weights_and_other_devices(tiny_model, monkeypatch):
    _cpu(monkeypatch, ("avx512_bf16",))
    monkeypatch.setattr(models.precision, "weight_dtype", lambda model: torch.bfloat16)
    assert models.resolve_autocast(tiny_model, "auto") is None
    assert "bfloat16 weights" in models.describe_precision(tiny_model, "auto")
    monkeypatch.undo()
    monkeypatch.setattr(models.precision, "device", lambda model: torch.device("mps"))
    assert models.resolve_autocast(tiny_model, "auto") is None


@hardware
def test_the_environment_variable_fixes_what_auto_means(tiny_model, monkeypatch):
    _cpu(monkeypatch, ("avx512_bf16",))
    monkeypatch.setenv("CHG_LENS_AUTOCAST", "off")
    assert models.resolve_autocast(tiny_model, "auto") is None
    assert "CHG_LENS_AUTOCAST=off" in models.describe_precision(tiny_model, "auto")
    assert models.resolve_autocast(tiny_model, "bf16") == "bf16"  # an explicit mode still wins
    _cpu(monkeypatch)
    monkeypatch.setenv("CHG_LENS_AUTOCAST", "bf16")
    assert models.resolve_autocast(tiny_model, "auto") == "bf16"
    monkeypatch.setenv("CHG_LENS_AUTOCAST", "float32")
    with pytest.raises(ValueError, match="CHG_LENS_AUTOCAST"):
        models.resolve_autocast(tiny_model, "auto")


def test_explicit_modes_and_bad_values(tiny_model):
    assert models.resolve_autocast(tiny_model, "off") is None
    assert models.resolve_autocast(tiny_model, None) is None
    assert models.resolve_autocast(tiny_model, "bf16") == "bf16"
    assert models.resolve_autocast(tiny_model, torch.float16) == "fp16"
    assert models.resolve_autocast(tiny_model, "auto") is None  # pinned to float32 in tests (conftest)
    for bad in ("float32", "int8", "on"):
        with pytest.raises(ValueError, match="autocast must be one of"):
            models.resolve_autocast(tiny_model, bad)


def test_the_cli_has_autocast_on_every_model_running_subcommand():
    import argparse

    from chg_lens.cli import subcommand

    # precision per purpose (issue 28): fits default to auto, measurements to the model's own dtype
    for name, default in (("fit", "auto"), ("contrast", "auto"), ("ablate", "off"), ("patch", "off"),
                          ("explain", "off")):
        p = argparse.ArgumentParser()
        subcommand(name).add_arguments(p)
        assert p.parse_args([]).autocast == default, name
        assert p.parse_args(["--autocast", "off"]).autocast == "off"
        with pytest.raises(SystemExit):
            p.parse_args(["--autocast", "float32"])


# ----------------------------------------------------------------------------- same answers
@hardware
def test_auto_default_fit_finds_the_same_roles_as_float32(known_model, monkeypatch):
    _cpu(monkeypatch, ("avx512_bf16",))  # auto -> bf16, whatever this machine has
    data = known_answer_data(32)
    kw = dict(n_seeds=1, updates=40, reg_updates=40, batch_size=8, progress=False, validation=data)
    fast = fit_chg(known_model, data, **kw)
    plain = fit_chg(known_model, data, autocast="off", **kw)
    assert fast.meta["autocast"] == "bf16" and "bf16 autocast" in fast.meta["precision"]
    assert plain.meta["autocast"] is None and "float32" in plain.meta["precision"]
    for stage in ("g0", "g_plus", "g_minus"):
        assert (fast.gates[stage] - plain.gates[stage]).abs().max() < TOL_GATES, stage
    assert fast.scores()["role"].tolist() == plain.scores()["role"].tolist()
    assert set(fast.scores()["role"]) >= {"facilitating", "irrelevant"}  # the known answer is found
    assert fast.meta["validation_precision"] == "float32"
    assert all(p.dtype == torch.float32 and p.grad is None for p in known_model.parameters())


@hardware
def test_auto_reaches_ablation_and_patching_metadata(tiny_model, monkeypatch):
    _cpu(monkeypatch, ("avx512_bf16",))
    toks, mask = _batch(tiny_model, rows=3)
    data = TaskDataset.from_tokens(toks, mask, pad_token_id=3)
    fast = head_sweep(tiny_model, data, autocast="auto")  # asked for: measurements default to "off"
    plain = head_sweep(tiny_model, data)
    assert fast.meta["autocast"] == "bf16" and plain.meta["autocast"] is None
    diff = (fast.frame["logprob"] - plain.frame["logprob"]).abs().max()
    assert 0 < diff < 0.05 * toks.shape[1]  # it ran in bf16, and close to float32 (summed over targets)


# ----------------------------------------------------------------------------- cast once
def _grads_and_scores(model, toks, mask, cfg, mode):
    g = cfg.clone().requires_grad_(True)
    r = row_logprobs(model, toks, mask, g, autocast=mode)
    r.nll.sum().backward()
    return r.logprob_sum.detach(), g.grad


@pytest.fixture(scope="module")
def tied_model():
    """Tied embedding and unembedding (as in SmolLM2): the shared weight must stay float32."""
    hf = tiny_llama_hf(len(WORDS), seed=3)
    hf.config.tie_word_embeddings = True
    hf.lm_head.weight = hf.model.embed_tokens.weight
    return models.load_model(hf, tokenizer=word_tokenizer(WORDS))


@pytest.mark.parametrize("which", ["tiny_model", "tied_model"])
def test_cast_weights_once_equals_plain_autocast_bit_for_bit(which, request):
    model = request.getfixturevalue(which)
    toks, mask = _batch(model)
    cfg = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(1))
    with models.frozen(model):
        plain = _grads_and_scores(model, toks, mask, cfg, "bf16")
        with models.cast_weights_once(model, "bf16") as n:
            assert n > 0
            once = _grads_and_scores(model, toks, mask, cfg, "bf16")
    assert torch.equal(once[0], plain[0]) and torch.equal(once[1], plain[1])
    full = _grads_and_scores(model, toks, mask, cfg, "off")
    assert not torch.equal(full[0], plain[0])  # bf16 really ran


def test_cast_weights_once_restores_the_weights_exactly_also_on_error(tiny_model):
    before = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in tiny_model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with models.cast_weights_once(tiny_model, "bf16") as n:
            low = [p for p in tiny_model.parameters() if p.dtype == torch.bfloat16]
            assert len(low) == n > 0
            with models.cast_weights_once(tiny_model, "bf16") as inner:
                assert inner == 0  # nested: already cast, nothing more to do
            raise RuntimeError("boom")
    for name, p in tiny_model.named_parameters():
        param, ptr, copy = before[name]
        assert p is param and p.data_ptr() == ptr and p.dtype == copy.dtype and torch.equal(p, copy), name
    with models.cast_weights_once(tiny_model, None) as n:
        assert n == 0


def test_fit_with_weights_cast_once_equals_the_per_op_cast_fit(known_model, monkeypatch):
    data = known_answer_data(16)
    kw = dict(n_seeds=2, updates=6, reg_updates=6, batch_size=8, progress=False, autocast="bf16")
    once = fit_chg(known_model, data, **kw)
    monkeypatch.setattr(models, "cast_weights_once", lambda model, mode: contextlib.nullcontext(0))
    per_op = fit_chg(known_model, data, **kw)
    for stage in ("g0", "g_plus", "g_minus"):
        assert torch.equal(once.logits[stage], per_op.logits[stage]), stage


def test_sweep_with_weights_cast_once_equals_per_op_cast(tiny_model, monkeypatch):
    toks, mask = _batch(tiny_model, rows=3)
    data = TaskDataset.from_tokens(toks, mask, pad_token_id=3)
    cfg = gates.single_head_configs(tiny_model)
    once = score_configs(tiny_model, data, cfg, autocast="bf16")
    monkeypatch.setattr(models, "cast_weights_once", lambda model, mode: contextlib.nullcontext(0))
    per_op = score_configs(tiny_model, data, cfg, autocast="bf16")
    assert torch.equal(once.logprob_sum, per_op.logprob_sum)


def test_gates_multiply_in_float32_on_low_precision_z():
    z = torch.randn(2, 3, 4, 8).to(torch.bfloat16)
    g = torch.full((1, 4), 1 / 3)
    out = gates.gate_z(z, g)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (z.float() * (1 / 3)).to(torch.bfloat16))


def test_explain_recording_under_bf16_gives_float32_close_to_float32(tiny_model):
    from chg_lens.explain.record import record_batch

    toks, _ = _batch(tiny_model)
    heads = [(0, 1), (1, 2)]
    plain = record_batch(tiny_model, toks, heads)
    with models.cast_weights_once(tiny_model, "bf16"), models.autocast(tiny_model, "bf16"):
        fast = record_batch(tiny_model, toks, heads)
    assert fast[0].dtype == fast[2].dtype == torch.float32
    torch.testing.assert_close(fast[0], plain[0], rtol=0.05, atol=1e-3)
    torch.testing.assert_close(fast[2], plain[2], rtol=0.05, atol=1e-2)


# ----------------------------------------------------------------------------- precision per purpose (issue 28)
def _pairs(model, n=6, width=7, seed=0):
    """Clean/corrupted rows of equal length differing in one token, target the last token."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, model.cfg.d_vocab, (n, width), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, model.cfg.d_vocab, (n,), generator=g)
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, -1] = True
    return (TaskDataset.from_tokens(clean, mask, name="clean"), TaskDataset.from_tokens(corrupted, mask, name="corrupted"))


def _hf_logprobs(model, data):
    """The model's own full forward (no autocast, float32): summed target log-prob per row."""
    with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
        logits = models.run_with_hooks(model, data.tokens).float().log_softmax(-1)
    lp = logits[:, :-1].gather(-1, data.tokens[:, 1:, None]).squeeze(-1)
    return (lp * data.loss_mask[:, 1:]).sum(1)


def test_measurements_stay_exact_when_auto_means_bf16_and_fits_record_bf16(tiny_model, monkeypatch):
    """Under CHG_LENS_AUTOCAST=bf16 ("auto" means bf16 everywhere) every measurement at its defaults
    runs in the model's own dtype: evaluate, score_configs, head_sweep and patch_heads equal float32 and
    TransformerLens's own patching module, while a fit at its defaults runs (and records) bf16."""
    from transformer_lens import patching as tl_patching

    from chg_lens import evaluate
    from chg_lens.patching import patch_heads

    monkeypatch.setenv(models.AUTOCAST_ENV, "bf16")
    assert models.resolve_autocast(tiny_model, "auto") == "bf16"
    clean, corrupted = _pairs(tiny_model)
    want = _hf_logprobs(tiny_model, clean)
    assert torch.allclose(evaluate(tiny_model, clean).logprob_sum[0], want, atol=1e-5)
    configs = gates.single_head_configs(tiny_model)
    exact = score_configs(tiny_model, clean, configs, autocast="off").logprob_sum
    assert torch.equal(score_configs(tiny_model, clean, configs).logprob_sum, exact)
    fast = score_configs(tiny_model, clean, configs, autocast="auto").logprob_sum
    assert (fast - exact).abs().max() > 1e-4  # auto really is bf16 here: the default is not auto
    sweep = head_sweep(tiny_model, clean)
    assert sweep.meta["autocast"] is None and "autocast off" in sweep.meta["precision"]
    assert torch.allclose(torch.tensor(sweep.frame["logprob"].to_numpy()).float(), exact.mean(1), atol=1e-5)

    res = patch_heads(tiny_model, clean, corrupted, metric="logprob")
    assert res.meta["autocast"] is None

    def metric(logits):  # the summed target log-prob of the clean targets, mean over rows (as patch_heads)
        lp = logits.float().log_softmax(-1)[:, :-1].gather(-1, corrupted.tokens[:, 1:, None]).squeeze(-1)
        return (lp * corrupted.loss_mask[:, 1:]).sum(1).mean()

    _, cache = tiny_model.run_with_cache(clean.tokens)
    tl = tl_patching.get_act_patch_attn_head_out_all_pos(tiny_model, corrupted.tokens, cache, metric)
    base = metric(tiny_model(corrupted.tokens))
    assert torch.allclose(res.effects, (tl - base).float(), atol=1e-5)

    fit = fit_chg(tiny_model, clean, n_seeds=1, updates=2, reg_updates=2, batch_size=4, progress=False,
                  validation=clean)
    assert fit.meta["autocast"] == "bf16" and "bf16 autocast" in fit.meta["precision"]
