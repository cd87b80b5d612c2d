"""Shared fixtures: tiny models built in the test (random or hand-set weights), the real SmolLM2
model for tests marked slow, and the shared data folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import chg_lens
from chg_lens import models

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHG_LENS_SHARED_DATA", REPO.parent / "shared" / "data"))


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def die_on_call(monkeypatch, owner, name: str, n: int, error: type[BaseException] = Killed) -> None:
    """Make ``owner.name`` raise ``error`` on its ``n``-th call; the calls before run the real
    function. Use inside ``monkeypatch.context()`` so the real one is back afterwards::

        with monkeypatch.context() as m:
            die_on_call(m, fitting, "batch_rows", 6)   # a kill during the 6th batch
            with pytest.raises(Killed):
                fit_chg(model, data, checkpoint_dir=ck, checkpoint_every=2)
    """
    real, calls = getattr(owner, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


@pytest.fixture
def no_model_load(monkeypatch):
    """A test that uses this fails if anything loads a model (errors that must come before the load)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(chg_lens, "load_model", refuse)
    monkeypatch.setattr(chg_lens.models, "load_model", refuse)
    monkeypatch.setattr(chg_lens.models.loading, "load_model", refuse)  # what as_model(name) calls


@pytest.fixture(scope="session", autouse=True)
def _auto_precision_is_float32():
    """``autocast="auto"`` (the library default) means float32 in every test, fixture and worker
    process (``CHG_LENS_AUTOCAST=off``), on every machine, so tolerances do not depend on whether
    bf16 pays on this CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.AUTOCAST_ENV, "off")
        yield


@pytest.fixture(autouse=True)
def _hardware_precision(request, _auto_precision_is_float32, monkeypatch):
    """Tests of the precision choice itself (``@pytest.mark.hardware_precision``) see the real rule."""
    if request.node.get_closest_marker("hardware_precision") is not None:
        monkeypatch.delenv(models.AUTOCAST_ENV, raising=False)


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over ``words`` (the first four: unk, bos, eos, pad)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token=words[0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=words[0], bos_token=words[1],
                                   eos_token=words[2], pad_token=words[3])
    with tempfile.TemporaryDirectory() as d:  # a saved-and-reloaded tokenizer, as users have
        fast.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d)


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    folder = SHARED_DATA / "tokenizers" / "gpt2"
    if not folder.exists():
        pytest.skip(f"shared GPT-2 tokenizer not found at {folder}")
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    tok.pad_token = tok.eos_token
    return tok


def tiny_llama_hf(vocab_size: int, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, seed=0, d_mlp=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=n_heads * d_head, intermediate_size=d_mlp,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=128, tie_word_embeddings=False, head_dim=d_head)
    return LlamaForCausalLM(cfg).eval()


WORDS = ["<unk>", "<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(28)]


@pytest.fixture(scope="session")
def tiny_model():
    """2 layers, 4 query heads over 2 key-value heads (grouped-query attention), random weights."""
    tok = word_tokenizer(WORDS)
    return models.load_model(tiny_llama_hf(len(WORDS)), tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_gpt2_vocab_model():
    """A random 2-layer Llama with the GPT-2 tokenizer: real prompts, tiny compute."""
    tok = gpt2_tokenizer()
    return models.load_model(tiny_llama_hf(len(tok), n_layers=2, n_heads=4, n_kv_heads=4, d_head=8), tokenizer=tok)


# ----------------------------------------------------------------------------- known answer
A_TOKENS = [f"a{i}" for i in range(8)]
D_TOKENS = [f"d{i}" for i in range(8)]
KNOWN_WORDS = ["<unk>", "<bos>", "<eos>", "<pad>"] + A_TOKENS + D_TOKENS + ["q"]


def known_answer_hf():
    """One layer, 4 query heads over 2 KV heads, hand-set weights, prompts ``<bos> a_i d_j q`` -> ``a_i``.

    Attention is uniform (W_Q = W_K = 0). The shared value head maps a-tokens and d-tokens to
    separate halves of d_head. Head 0 writes a_i's output direction (it copies the answer: it
    facilitates), head 1 writes the output direction of a_j, the answer the distractor d_j names
    (it interferes), heads 2 and 3 write nothing (W_O = 0: irrelevant). The MLP writes nothing.
    """
    V = len(KNOWN_WORDS)
    n_heads, d_head = 4, 16
    d_model = n_heads * d_head
    hf = tiny_llama_hf(V, n_layers=1, n_heads=n_heads, n_kv_heads=2, d_head=d_head)
    out_dim = lambda t: V + t  # output space: dims V..2V-1
    tid = {w: i for i, w in enumerate(KNOWN_WORDS)}
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.model.embed_tokens.weight[:, :V] = 40.0 * torch.eye(V)  # large: head outputs' size matters after the final norm
        attn = hf.model.layers[0].self_attn
        # v_proj: [n_kv * d_head, d_model]; KV head 0 serves query heads 0 and 1.
        for k in range(8):
            attn.v_proj.weight[k, tid[A_TOKENS[k]]] = 1.0
            attn.v_proj.weight[8 + k, tid[D_TOKENS[k]]] = 1.0
        # o_proj: [d_model, n_heads * d_head]; head h occupies columns h*d_head:(h+1)*d_head.
        s = 20.0
        for k in range(8):
            attn.o_proj.weight[out_dim(tid[A_TOKENS[k]]), 0 * d_head + k] = s        # head 0: copy answer
            attn.o_proj.weight[out_dim(tid[A_TOKENS[k]]), 1 * d_head + 8 + k] = s    # head 1: distractor's answer
        hf.lm_head.weight[:, V:2 * V] = 0.5 * torch.eye(V)  # soft: the answer never saturates
        for norm in (hf.model.layers[0].input_layernorm, hf.model.layers[0].post_attention_layernorm, hf.model.norm):
            norm.weight.fill_(1.0)
    return hf


def known_answer_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tid = {w: i for i, w in enumerate(KNOWN_WORDS)}
    rows = []
    for _ in range(n):
        i, j = torch.randperm(8, generator=g)[:2].tolist()
        rows.append([tid["<bos>"], tid[A_TOKENS[i]], tid[D_TOKENS[j]], tid["q"], tid[A_TOKENS[i]]])
    tokens = torch.tensor(rows)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    return chg_lens.TaskDataset.from_tokens(tokens, mask, pad_token_id=tid["<pad>"], name="known_answer")


@pytest.fixture(scope="session")
def known_model():
    return models.load_model(known_answer_hf(), tokenizer=word_tokenizer(KNOWN_WORDS))


# ----------------------------------------------------------------------------- real model
@pytest.fixture(scope="session")
def smollm2():
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return chg_lens.load_model("smollm2-135m-instruct")
