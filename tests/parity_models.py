"""Tiny random models of every decoder family, and the references chg_lens is checked against.

Used by tests/test_parity.py and benchmarks/parity_table.py. Each Hugging Face family is one small
config (2 layers, d_model <= 64) with its unembedding scaled x30 so logit soft-caps and scalings
bite. The references never go through chg_lens or TransformerLens hooks: the Hugging Face model's
own forward, with a forward pre-hook on the attention output projection that scales head ``h``'s
slice of its input (the reference implementation's way of ablating a head).
"""

from __future__ import annotations

import contextlib
import importlib

import torch

V = 40  # vocabulary of the word tokenizer below
D, H, DH = 32, 4, 8  # d_model, heads, d_head
L = 2
UNEMBED_SCALE = 30.0

_COMMON = dict(vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
_LLAMA_LIKE = dict(_COMMON, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
                   num_key_value_heads=2, head_dim=DH)

# family -> (config class, model class, config kwargs, path of layer l's attention output projection)
FAMILIES: dict[str, tuple[str, str, dict, str]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=64), "transformer.h.{l}.attn.c_proj"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_COMMON, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=48,
                      rotary_pct=0.5), "gpt_neox.layers.{l}.attention.dense"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=64, rotary_dim=4,
                  tie_word_embeddings=False), "transformer.h.{l}.attn.out_proj"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(_COMMON, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=48,
                 word_embed_proj_dim=D), "model.decoder.layers.{l}.self_attn.out_proj"),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=V, hidden_size=D, n_layer=L, n_head=H, tie_word_embeddings=False),
              "transformer.h.{l}.self_attention.dense"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(_COMMON, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, alibi=False,
                    new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
               "transformer.h.{l}.self_attention.dense"),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), "model.layers.{l}.self_attn.o_proj"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       decoder_sparse_step=1), "model.layers.{l}.self_attn.o_proj"),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(_COMMON, hidden_size=D, intermediate_size=48, num_hidden_layers=L, num_attention_heads=H,
                 partial_rotary_factor=0.5), "model.layers.{l}.self_attn.dense"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_LIKE, pad_token_id=0), "model.layers.{l}.self_attn.o_proj"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_LLAMA_LIKE, final_logit_softcapping=5.0, attn_logit_softcapping=10.0),
               "model.layers.{l}.self_attn.o_proj"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_LLAMA_LIKE, final_logit_softcapping=5.0, sliding_window=4),
               "model.layers.{l}.self_attn.o_proj"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(_LLAMA_LIKE, partial_rotary_factor=0.5), "model.layers.{l}.self_attn.o_proj"),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, max_position_embeddings=64,
                     attention_types=[[["global", "local"], 1]], window_size=4, tie_word_embeddings=False),
                "transformer.h.{l}.attn.attention.out_proj"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=64, rotary_dim=4,
                     tie_word_embeddings=False), "transformer.h.{l}.attn.out_proj"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=64, multi_query=True,
                         tie_word_embeddings=False), "transformer.h.{l}.attn.c_proj"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2),
              "model.layers.{l}.self_attn.o_proj"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, decoder_sparse_step=1),
                  "model.layers.{l}.self_attn.o_proj"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0),
                   "model.layers.{l}.self_attn.o_proj"),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=64, expansion_ratio=2),
            "transformer.blocks.{l}.attn.out_proj"),
    "xglm": ("XGLMConfig", "XGLMForCausalLM",
             dict(vocab_size=V, d_model=D, num_layers=L, attention_heads=H, ffn_dim=48, max_position_embeddings=64),
             "model.layers.{l}.self_attn.out_proj"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(_LLAMA_LIKE, pad_token_id=0), "model.layers.{l}.self_attn.o_proj"),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(_LLAMA_LIKE, pad_token_id=0), "model.layers.{l}.self_attn.o_proj"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", _LLAMA_LIKE, "model.layers.{l}.self_attn.o_proj"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.25, sliding_window=4),
                "model.layers.{l}.self_attn.o_proj"),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.25),
               "model.layers.{l}.self_attn.o_proj"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_LLAMA_LIKE, logits_scaling=4.0),
                "model.layers.{l}.self_attn.o_proj"),
}


def words():
    return ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(V - 4)]


def hf_model(family: str, seed: int = 0):
    """The family's tiny random causal LM (fp32, eval), unembedding scaled x30."""
    import transformers

    cfg_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # init is often std 0.02: make heads matter
            if p.ndim >= 2:
                p.normal_(0, 0.2)
        model.get_output_embeddings().weight.mul_(UNEMBED_SCALE / 6)
    return model


def oproj(model, family: str, layer: int) -> torch.nn.Module:
    return model.get_submodule(FAMILIES[family][3].format(l=layer))


@contextlib.contextmanager
def scale_heads(model, family: str, scales: dict[tuple[int, int], float], d_head: int):
    """Scale head ``h``'s slice of layer ``l``'s attention output projection input (HF layout:
    heads concatenated, head ``h`` at ``h*d_head:(h+1)*d_head``), by forward pre-hooks."""
    handles = []
    for layer in sorted({l for l, _ in scales}):
        heads = {h: s for (l, h), s in scales.items() if l == layer}

        def pre(module, args, heads=heads):
            x = args[0].clone()
            for h, s in heads.items():
                x[..., h * d_head:(h + 1) * d_head] *= s
            return (x, *args[1:])

        handles.append(oproj(model, family, layer).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float().log_softmax(-1)


def available(family: str) -> bool:
    import transformers

    return all(hasattr(transformers, n) for n in FAMILIES[family][:2])


def tl3_configs() -> dict[str, dict]:
    """TransformerLens 3.x ``HookedTransformerConfig`` variants."""
    base = dict(n_layers=L, d_model=D, n_heads=H, d_head=DH, d_mlp=48, n_ctx=32, d_vocab=V, act_fn="gelu",
                seed=0)
    out = {f"norm={n}": dict(base, normalization_type=n) for n in ("LN", "LNPre", "RMS", "RMSPre", None)}
    out["attn_only,norm=None"] = dict(base, attn_only=True, normalization_type=None)
    out["parallel_attn_mlp"] = dict(base, parallel_attn_mlp=True, normalization_type="LN")
    out["gqa(n_key_value_heads=2)"] = dict(base, n_key_value_heads=2, normalization_type="RMS",
                                           positional_embedding_type="rotary", rotary_dim=DH, gated_mlp=True,
                                           act_fn="silu")
    out["output_logits_soft_cap=5"] = dict(base, normalization_type="RMS", output_logits_soft_cap=5.0)
    return out


def tl3_model(name: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**tl3_configs()[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
        model.unembed.W_U.mul_(UNEMBED_SCALE / 6)
    return model


def tl3_reference(model, tokens, scales: dict[tuple[int, int], float]) -> torch.Tensor:
    """Log-probs of a copy of the HookedTransformer with head ``h``'s ``W_O`` rows scaled (no hooks)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for (l, h), s in scales.items():
            ref.blocks[l].attn.W_O[h] *= s
        return ref(tokens).float().log_softmax(-1)


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


SCALES_0 = {(0, 1): 0.0, (1, 2): 0.0}  # gate 0 on L0H1 and L1H2
SCALES_HALF = {(0, 3): 0.5, (1, 0): 0.5}


def tokens(seed: int = 1, rows: int = 3, width: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (rows, width), generator=g)


def gate_tensor(scales: dict[tuple[int, int], float], n_layers: int = L, n_heads: int = H) -> torch.Tensor:
    g = torch.ones(n_layers, n_heads)
    for (l, h), s in scales.items():
        g[l, h] = s
    return g


def chg_logprobs(model, toks: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """chg_lens's log-probs at every position under each configuration: ``[K, rows, pos, d_vocab]``."""
    from chg_lens import gates as gates_mod, models

    K = gates.shape[0]
    rows, pos = torch.meshgrid(torch.arange(toks.shape[0]), torch.arange(toks.shape[1]), indexing="ij")
    rows, pos = rows.reshape(-1), pos.reshape(-1)
    hooks = gates_mod.gate_hooks(models.check_model(model), gates, skip_identity=False)
    with torch.no_grad():
        (logits,) = models.logits_at(model, toks.repeat(K, 1), [(rows, pos)], hooks, lead=K)
    return logits.float().log_softmax(-1).reshape(K, *toks.shape, -1)


def parity_errors(model, toks: torch.Tensor, reference) -> dict[str, float]:
    """Max abs log-prob error of chg_lens vs ``reference(scales)`` ungated, gate-0 and gate-1/2 configs,
    and of all-ones gates vs ungated."""
    configs = torch.stack([gate_tensor({}), gate_tensor(SCALES_0), gate_tensor(SCALES_HALF)])
    ours = chg_logprobs(model, toks, configs)
    from chg_lens import models

    rows, pos = torch.meshgrid(torch.arange(toks.shape[0]), torch.arange(toks.shape[1]), indexing="ij")
    with torch.no_grad():
        (plain,) = models.logits_at(model, toks, [(rows.reshape(-1), pos.reshape(-1))], ())
    plain = plain.float().log_softmax(-1).reshape(*toks.shape, -1)
    return {
        "ungated": float((plain - reference({})).abs().max()),
        "gate0": float((ours[1] - reference(SCALES_0)).abs().max()),
        "gate_half": float((ours[2] - reference(SCALES_HALF)).abs().max()),
        "gate1": float((ours[0] - plain).abs().max()),
        "gate0_effect": float((reference(SCALES_0) - reference({})).abs().max()),
    }


def hf_parity(family: str) -> dict[str, float]:
    """Boot the family through chg_lens.load_model and measure :func:`parity_errors` against HF."""
    import warnings

    import chg_lens
    from conftest import word_tokenizer

    hf = hf_model(family)
    toks = tokens()
    d_head = int(hf.config.hidden_size // hf.config.num_attention_heads) if not getattr(
        hf.config, "head_dim", None) else int(hf.config.head_dim)
    ref_cache: dict = {}

    def reference(scales):
        key = tuple(sorted(scales.items()))
        if key not in ref_cache:
            with scale_heads(hf, family, scales, d_head):
                ref_cache[key] = hf_logprobs(hf, toks)
        return ref_cache[key]

    for s in ({}, SCALES_0, SCALES_HALF):  # before the bridge wraps the HF model
        reference(s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = chg_lens.load_model(hf, tokenizer=word_tokenizer(words()))
    return parity_errors(model, toks, reference)


def tl3_parity(name: str) -> dict[str, float]:
    model = tl3_model(name)
    toks = tokens()
    return parity_errors(model, toks, lambda scales: tl3_reference(model, toks, scales))
