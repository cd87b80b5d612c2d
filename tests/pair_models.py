"""Pairs, references and wired models shared by the attribution, faithfulness and patching tests.

The references never go through chg_lens: plain TransformerLens hooks on ``hook_z`` (z cached, or
kept with ``retain_grad``) and the metric from the model's own full logits.
"""

from __future__ import annotations

import torch

import chg_lens

import parity_models
from conftest import A_TOKENS, KNOWN_WORDS, known_answer_data, tiny_llama_hf

PAD = 3


def random_pair(seed=0, rows=8, width=7, *, corrupted_answers=True):
    """Random clean rows of ``width`` tokens with targets from position 5, corrupted twins (token 2
    changed), and random ``answers`` (two ids per row) for a logit difference, on the clean rows and
    (``corrupted_answers``) the same on the corrupted ones."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 32, (rows, width), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, 32, (rows,), generator=g)
    mask = torch.zeros_like(clean, dtype=torch.bool)
    mask[:, 5:] = True
    a = chg_lens.TaskDataset.from_tokens(clean, mask, name="clean")
    b = chg_lens.TaskDataset.from_tokens(corrupted, mask, name="corrupted")
    a.row_meta["answers"] = torch.randint(4, 32, (rows, 2), generator=g).tolist()
    if corrupted_answers:
        b.row_meta["answers"] = a.row_meta["answers"]
    return a, b


def ragged_pair(seed=0, rows=6, vocab=parity_models.V):
    """Clean rows of 6-8 tokens (right-padded), two targets at the end; corrupted = token 2 changed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 9, (rows,), generator=g)
    clean_rows, corrupt_rows, masks = [], [], []
    for n in lengths.tolist():
        r = torch.randint(4, vocab, (n,), generator=g).tolist()
        c = list(r)
        c[2] = 4 + (r[2] - 4 + int(torch.randint(1, vocab - 4, (1,), generator=g))) % (vocab - 4)
        clean_rows.append(r)
        corrupt_rows.append(c)
        masks.append([False] * (n - 2) + [True, True])
    clean = chg_lens.TaskDataset.from_tokens(clean_rows, masks, PAD, "clean")
    corrupted = chg_lens.TaskDataset.from_tokens(corrupt_rows, masks, PAD, "corrupted")
    clean.row_meta["answers"] = torch.randint(4, vocab, (rows, 2), generator=g).tolist()
    return clean, corrupted


def greedy_pair(model, seed=0):
    """:func:`ragged_pair` with one target per row, the corrupted run's own greedy next token: its
    probability is not vanishingly small (random targets of a model with large logits are)."""
    clean, corrupted = ragged_pair(seed)
    with torch.no_grad():
        logits = model(corrupted.tokens)
    last = corrupted.lengths - 1
    rows = torch.arange(len(clean))
    tokens = [d.tokens.clone() for d in (clean, corrupted)]
    for t in tokens:
        t[rows, last] = logits[rows, last - 1].argmax(-1)
    mask = torch.zeros_like(clean.loss_mask)
    mask[rows, last] = True
    out = [chg_lens.TaskDataset(t, mask, d.lengths, PAD, d.name) for t, d in zip(tokens, (clean, corrupted))]
    out[0].row_meta["answers"] = clean.row_meta["answers"]
    return out


# ----------------------------------------------------------------------------- references
def z_names(model):
    return [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]


def plain_z(model, tokens):
    """Every layer's z by plain TransformerLens hooks (no chg_lens)."""
    store = {}

    def save(name):
        def hook(z, hook):
            store[name] = z.detach().clone()
        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, save(n)) for n in z_names(model)])
    return [store[n] for n in z_names(model)]


def keeper(kept, name):
    """A hook that keeps the z it sees (and its gradient) under ``name``, changing nothing."""
    def hook(z, hook):
        z.retain_grad()
        kept[name] = z
        return z
    return hook


def plain_metric(logits, data, metric):
    """The per-row metric from the model's own full logits."""
    lp = logits.float().log_softmax(-1)
    rows, pos = data.loss_mask[:, 1:].nonzero(as_tuple=True)
    target_lp = lp[rows, pos, data.tokens[rows, pos + 1]]
    logprob = torch.zeros(len(data)).index_add(0, rows, target_lp)
    if metric == "logprob":
        return logprob
    if metric == "prob":
        return logprob.exp()
    first = data.loss_mask.float().argmax(dim=1) - 1
    ans = torch.tensor(data.row_meta["answers"])
    at = logits.float()[torch.arange(len(data)), first]
    return at.gather(1, ans[:, :1]).squeeze(1) - at.gather(1, ans[:, 1:2]).squeeze(1)


def plain_atp(model, run, metric, sources, positions=None, scored_on=None):
    """AtP by plain hooks: ((z_source - z_run) * d metric / d z_run) summed over positions and d_head,
    per row; ``sources`` is one tensor per layer broadcastable to z. Returns [rows, layers, heads]."""
    kept = {}
    logits = model.run_with_hooks(run.tokens, fwd_hooks=[(n, keeper(kept, n)) for n in z_names(model)])
    scored = scored_on if scored_on is not None else run
    plain_metric(logits, scored, metric).sum().backward()
    out = []
    for n, src in zip(z_names(model), sources):
        z = kept[n]
        term = (src - z.detach()) * z.grad
        if positions is not None:
            term = term * positions[:, :, None, None]
        out.append(term.sum(dim=(1, 3)))
    model.zero_grad(set_to_none=True)
    return torch.stack(out, dim=1)


def mean_z_by_hand(model, data):
    zs = plain_z(model, data.tokens)
    real = (torch.arange(data.tokens.shape[1])[None, :] < data.lengths[:, None]).float()
    return [(z * real[..., None, None]).sum(dim=(0, 1)) / real.sum() for z in zs]


# ----------------------------------------------------------------------------- known answers
def known_pairs(n=32, seed=0):
    """Clean '<bos> a_i d_j q a_i' and corrupted '<bos> a_k d_j q a_i' (another a token)."""
    tid = {w: i for i, w in enumerate(KNOWN_WORDS)}
    clean = known_answer_data(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    corrupt = clean.tokens.clone()
    a_ids = torch.tensor([tid[f"a{k}"] for k in range(8)])
    for r in range(n):
        choices = a_ids[a_ids != clean.tokens[r, 1]]
        corrupt[r, 1] = choices[torch.randint(len(choices), (1,), generator=g)]
    corrupted = chg_lens.TaskDataset.from_tokens(corrupt, clean.loss_mask.clone(), pad_token_id=clean.pad_token_id,
                                                 name="known_corrupted")
    clean.row_meta["answers"] = [[int(c[-1]), int(k[1])] for c, k in zip(clean.tokens, corrupt)]
    return clean, corrupted


CIRCUIT = {(0, 0), (1, 1)}


def circuit_hf(noise=0.3, seed=0):
    """Two layers, 4 query heads over 2 KV heads, hand-set weights, prompts ``<bos> a_i d_j q`` ->
    ``a_i`` (conftest's known-answer data); attention is uniform (W_Q = W_K = 0), the MLPs write
    nothing. The circuit is serial: L0H0 (the mover) reads which a token the prompt holds and writes
    its code into a subspace S1 of the residual stream; L1H1 (the reader) reads S1 and writes the
    answer's output direction. Neither works without the other. The six other heads read random
    directions of the tokens and write small random vectors into the output directions (noise that
    every method must rank below the circuit)."""
    V, nh, dh = len(KNOWN_WORDS), 4, 16
    hf = tiny_llama_hf(V, n_layers=2, n_heads=nh, n_kv_heads=2, d_head=dh)
    tid = {w: i for i, w in enumerate(KNOWN_WORDS)}
    S1 = 2 * V  # residual dims 2V..2V+7: the mover's code (dims V..2V-1 are the output directions)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        hf.model.embed_tokens.weight[:, :V] = 40.0 * torch.eye(V)
        a0, a1 = hf.model.layers[0].self_attn, hf.model.layers[1].self_attn
        for k in range(8):
            a0.v_proj.weight[k, tid[A_TOKENS[k]]] = 1.0                    # L0, KV head 0: which a token
            a0.o_proj.weight[S1 + k, 0 * dh + k] = 10.0                     # L0H0 writes it into S1
            a1.v_proj.weight[k, S1 + k] = 1.0                               # L1, KV head 0 reads S1
            a1.o_proj.weight[V + tid[A_TOKENS[k]], 1 * dh + k] = 20.0       # L1H1 writes the answer
        for attn, heads in ((a0, (1, 2, 3)), (a1, (0, 2, 3))):
            attn.v_proj.weight[dh:, :V] = torch.randn(dh, V, generator=g)  # KV head 1 (heads 2, 3): random reads
            for h in heads:
                attn.o_proj.weight[V:2 * V, h * dh:(h + 1) * dh] = noise * torch.randn(V, dh, generator=g)
        hf.lm_head.weight[:, V:2 * V] = 0.5 * torch.eye(V)
        for layer in hf.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        hf.model.norm.weight.fill_(1.0)
    return hf
