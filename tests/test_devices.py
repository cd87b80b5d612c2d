"""Devices and dtypes without a GPU.

Device check: every hook chg_lens puts on ``hook_z`` is also called on a ``meta`` copy of ``z``
(a stand-in for "z lives on another device"). A hook that combines z with a tensor it did not move
to z's device (gates, mean z, clean z, positions) raises there, exactly as it would on CUDA with
CPU-side tensors. Used on fit (with checkpoints), contrastive fit, the head sweep with mean ablation,
patching and explain recording. Plus bf16 end to end against fp32, the 3.x ``.to`` call, and
clear errors for models chg_lens cannot drive.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import chg_lens
from chg_lens import ablation, gates, models, patching
from chg_lens.chg import fit_chg
from chg_lens.contrastive import fit_contrastive

from conftest import WORDS, tiny_llama_hf, word_tokenizer


@contextlib.contextmanager
def device_checked(model):
    """Run every ``hook_z`` hook of ``model.run_with_hooks`` once more on a ``meta`` copy of z first;
    yields a dict counting the checked calls."""
    seen = {"calls": 0}
    real = model.run_with_hooks

    def wrap(fn):
        def hook(z, hook):
            out = fn(z.detach().to("meta"), hook)  # raises on any tensor not moved to z's device
            assert out is None or out.device.type == "meta", "the hook's output left z's device"
            seen["calls"] += 1
            return fn(z, hook)
        return hook

    def run_with_hooks(*args, fwd_hooks=(), **kwargs):
        hooks = [(n, wrap(f) if str(n).endswith("hook_z") else f) for n, f in fwd_hooks]
        return real(*args, fwd_hooks=hooks, **kwargs)

    model.run_with_hooks = run_with_hooks
    try:
        yield seen
    finally:
        del model.run_with_hooks


def _data(seed=0, rows=8, width=7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, len(WORDS), (rows, width), generator=g)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 5:] = True
    return chg_lens.TaskDataset.from_tokens(tokens, mask, name=f"d{seed}")


def test_the_device_check_catches_a_tensor_left_on_the_cpu(tiny_model):
    """Negative control: the old gate_z moved ``source`` to z's dtype only."""
    L, H, d = models.n_layers(tiny_model), models.n_heads(tiny_model), models.d_head(tiny_model)
    source = torch.zeros(H, d)
    bad = [(models.z_hook_name(0), lambda z, hook: z * 0 + source.to(z.dtype))]
    with device_checked(tiny_model):
        with pytest.raises((RuntimeError, NotImplementedError)):
            models.final_residual(tiny_model, _data().tokens, bad)
    good = gates.gate_hooks(tiny_model, torch.zeros(L, H), sources={0: source, 1: source})
    with device_checked(tiny_model) as seen:
        models.final_residual(tiny_model, _data().tokens, good)
    assert seen["calls"] == L


def test_every_path_keeps_tensors_on_zs_device(tiny_model, tmp_path):
    data, other = _data(0), _data(1)
    with device_checked(tiny_model) as seen:
        fit_chg(tiny_model, data, n_seeds=2, updates=2, reg_updates=2, batch_size=4, progress=False,
                checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
        fit_contrastive(tiny_model, data, other, updates=2, batch_size=4, progress=False, check_pairs=False)
        ablation.head_sweep(tiny_model, data, method="mean")
        clean, corrupted = _data(2), _data(2)
        corrupted.tokens[:, 2] = (corrupted.tokens[:, 2] + 1 - 4) % (len(WORDS) - 4) + 4
        clean.row_meta["answers"] = [[5, 6]] * len(clean)
        patching.patch_heads(tiny_model, clean, corrupted)
        chg_lens.attribute_heads(tiny_model, clean, corrupted)
        chg_lens.attribute_heads(tiny_model, data, source="mean", metric="logprob")
        chg_lens.faithfulness(tiny_model, clean, {"t": torch.rand(2, 4), "r": None}, ablation=corrupted,
                              n_heads=[2], n_random=1)
        from chg_lens.explain.record import record_batch

        record_batch(tiny_model, data.tokens, [(0, 1), (1, 2)])
    assert seen["calls"] > 20


def test_mean_z_and_clean_z_are_float32_sources_that_follow_z():
    hf = tiny_llama_hf(len(WORDS))
    model = models.load_model(hf, tokenizer=word_tokenizer(WORDS), dtype="bfloat16")
    data = _data()
    means = ablation.mean_z(model, data)
    clean = patching.clean_z(model, data)
    assert all(m.dtype == torch.float32 for m in means.values())
    z = torch.randn(8, 7, 4, 8, dtype=torch.bfloat16)
    out = gates.gate_z(z, torch.zeros(1, 4), means[0])
    assert out.dtype == torch.bfloat16 and torch.equal(out[0, 0], means[0].to(torch.bfloat16))
    assert clean[0].shape[:2] == data.tokens.shape


def test_bf16_model_end_to_end_is_close_to_fp32():
    """Gates stay fp32 parameters, log-softmax is fp32, and the fit lands near the fp32 one."""
    tok = word_tokenizer(WORDS)
    fp32 = models.load_model(tiny_llama_hf(len(WORDS)), tokenizer=tok)
    bf16 = models.load_model(tiny_llama_hf(len(WORDS)), tokenizer=tok, dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    data = _data(rows=16)
    e32 = chg_lens.evaluate(fp32, data)
    e16 = chg_lens.evaluate(bf16, data)
    assert e16.logprob_sum.dtype == torch.float32
    torch.testing.assert_close(e16.logprob_sum, e32.logprob_sum, atol=0.1 * data.n_targets.max().item(), rtol=0.05)
    kw = dict(n_seeds=2, updates=20, reg_updates=10, batch_size=8, progress=False)
    r32, r16 = fit_chg(fp32, data, **kw), fit_chg(bf16, data, **kw)
    for stage in ("g0", "g_plus", "g_minus"):
        assert r16.logits[stage].dtype == torch.float32
        assert float((torch.sigmoid(r16.logits[stage]) - torch.sigmoid(r32.logits[stage])).abs().max()) < 0.1


def test_load_model_moves_an_already_loaded_model_on_both_lines(tiny_model):
    """3.x HookedTransformer.to takes one positional device_or_dtype; the old keyword call failed."""
    import copy

    model = copy.deepcopy(tiny_model)
    moved = models.load_model(model, device="cpu", dtype="bfloat16")
    assert next(moved.parameters()).dtype == torch.bfloat16 and models.device(moved).type == "cpu"
    toks = _data().tokens
    torch.testing.assert_close(moved(toks).float(), tiny_model(toks).float(), atol=0.3, rtol=0.05)


def test_models_chg_lens_cannot_drive_are_refused_by_class_name():
    from transformers import BertConfig, BertForMaskedLM, BertModel, T5Config, T5ForConditionalGeneration

    tok = word_tokenizer(WORDS)
    bert = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16)
    for hf in (BertForMaskedLM(bert), BertModel(bert)):
        with pytest.raises(TypeError, match=type(hf).__name__ + ".*decoder-only"):
            models.load_model(hf, tokenizer=tok)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(WORDS), d_model=16, d_ff=16, num_layers=1, num_heads=2,
                                             d_kv=8))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration.*decoder-only"):
        models.load_model(t5, tokenizer=tok)
    with pytest.raises(TypeError, match="got Linear"):
        models.check_model(torch.nn.Linear(2, 2))


def test_a_model_without_hook_z_is_refused_before_any_work(tiny_model, monkeypatch):
    names = [n for n in tiny_model.hook_dict if not n.endswith("attn.hook_z")]
    monkeypatch.setattr(models.compat, "_hook_names", lambda model: names)
    with pytest.raises(TypeError, match=f"{type(tiny_model).__name__}.*hook_z"):
        chg_lens.evaluate(tiny_model, _data())


def test_gpu_smoke_script_runs_every_path_on_the_cpu_and_says_when_there_is_no_cuda(capsys):
    import importlib.util

    from conftest import REPO, SHARED_DATA

    if not (SHARED_DATA / "tokenizers" / "gpt2").exists():
        pytest.skip("shared GPT-2 tokenizer missing")
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--device", "cpu", "--tiny", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    for name in ("fit+checkpoint+resume", "contrastive", "head sweep (mean ablation)", "patching",
                 "explain recording", "report"):
        assert f"PASS  [fp32] {name}" in out
    if not torch.cuda.is_available():
        assert smoke.main([]) == 2 and "NO CUDA" in capsys.readouterr().out

