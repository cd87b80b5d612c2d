"""TaskDataset: the loss-mask convention, padding, splits, and every bad-input error."""

import pytest
import torch

from chg_lens import TaskDataset
from chg_lens.tasks import ioi, ioi_pairs


def test_from_prompts_masks_exactly_the_target_tokens(tiny_gpt2_vocab_model):
    tok = tiny_gpt2_vocab_model.tokenizer
    data = TaskDataset.from_prompts(tiny_gpt2_vocab_model, ["The capital of France is", "1, 2"], [" Paris", ", 3, 4"])
    for i, (p, t) in enumerate([("The capital of France is", " Paris"), ("1, 2", ", 3, 4")]):
        p_ids, t_ids = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
        n = len(p_ids) + len(t_ids)
        assert data.tokens[i, :n].tolist() == p_ids + t_ids
        assert data.tokens[i, n:].eq(tok.pad_token_id).all()
        assert data.loss_mask[i].nonzero().flatten().tolist() == list(range(len(p_ids), n))
    assert data.lengths.tolist() == [data.loss_mask[0].nonzero().max() + 1, data.loss_mask[1].nonzero().max() + 1]


def test_prepend_bos_is_explicit(tiny_gpt2_vocab_model):
    tok = tiny_gpt2_vocab_model.tokenizer
    bos = tok.bos_token_id
    with_bos = TaskDataset.from_prompts(tok, ["a b"], [" c"], prepend_bos=True)
    without = TaskDataset.from_prompts(tok, ["a b"], [" c"], prepend_bos=False)
    assert with_bos.tokens[0, 0] == bos and (with_bos.tokens[0] == bos).sum() == 1
    assert without.tokens[0, 0] != bos
    assert with_bos.lengths[0] == without.lengths[0] + 1


def test_padding_never_leaks_into_the_loss(tiny_gpt2_vocab_model):
    from chg_lens.scoring import row_logprobs

    data = TaskDataset.from_prompts(tiny_gpt2_vocab_model, ["Short", "A much longer prompt than that one"], [" x", " y"])
    both = row_logprobs(tiny_gpt2_vocab_model, data.tokens, data.loss_mask)
    alone = row_logprobs(tiny_gpt2_vocab_model, data.tokens[:1, : data.lengths[0]], data.loss_mask[:1, : data.lengths[0]])
    torch.testing.assert_close(both.logprob_sum[0, 0], alone.logprob_sum[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tokens, mask, match",
    [
        (torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.bool), "empty"),
        (torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.bool), "no target"),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 0, 1]], dtype=torch.bool), "first token"),
        (torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool), "shaped like tokens"),
    ],
)
def test_bad_tokens_raise_clear_errors(tokens, mask, match):
    with pytest.raises(ValueError, match=match):
        TaskDataset.from_tokens(tokens, mask)


def test_ragged_lists_and_mismatched_lengths():
    data = TaskDataset.from_tokens([[1, 2, 3], [4, 5]], [[0, 0, 1], [0, 1]], pad_token_id=9)
    assert data.tokens.tolist() == [[1, 2, 3], [4, 5, 9]] and data.lengths.tolist() == [3, 2]
    with pytest.raises(ValueError, match="row 1: 2 tokens but 3"):
        TaskDataset.from_tokens([[1, 2, 3], [4, 5]], [[0, 0, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="2 token rows but 1"):
        TaskDataset.from_tokens([[1, 2, 3], [4, 5]], [[0, 0, 1]])


def test_prompt_errors(tiny_gpt2_vocab_model):
    tok = tiny_gpt2_vocab_model.tokenizer
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        TaskDataset.from_prompts(tok, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match="no prompts"):
        TaskDataset.from_prompts(tok, [], [])
    with pytest.raises(ValueError, match="has no tokens"):
        TaskDataset.from_prompts(tok, ["a"], [""])
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        TaskDataset.from_prompts(tiny_gpt2_vocab_model, ["word " * 130], [" x"])
    import copy

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        TaskDataset.from_prompts(no_pad, ["a"], [" b"])


def test_check_model_rejects_rows_longer_than_the_context(tiny_model):
    data = TaskDataset.from_tokens(torch.ones(1, 200, dtype=torch.long), torch.arange(200)[None] == 199)
    with pytest.raises(ValueError, match="context is 128"):
        data.check_model(tiny_model)


def test_split_is_disjoint_and_seeded(tiny_gpt2_vocab_model):
    train, val = ioi(tiny_gpt2_vocab_model, n_prompts=40, seed=3)
    assert len(train) == 32 and len(val) == 8
    assert not set(train.prompts) & set(val.prompts)
    again, _ = ioi(tiny_gpt2_vocab_model, n_prompts=40, seed=3)
    other, _ = ioi(tiny_gpt2_vocab_model, n_prompts=40, seed=4)
    assert again.prompts == train.prompts and other.prompts != train.prompts
    # row annotations follow the rows through the split
    tok = tiny_gpt2_vocab_model.tokenizer
    for p, (io, s) in zip(train.prompts, train.row_meta["answers"]):
        assert p.endswith(tok.decode([io])) and tok.decode([s]) in p


def test_ioi_loss_is_on_the_indirect_object_and_pairs_align(tiny_gpt2_vocab_model):
    clean, corrupted = ioi_pairs(tiny_gpt2_vocab_model, n_prompts=10)
    assert clean.tokens.shape == corrupted.tokens.shape
    assert (clean.loss_mask.sum(1) == 1).all()
    io = torch.tensor([a for a, _ in clean.row_meta["answers"]])
    assert torch.equal(clean.tokens[clean.loss_mask], io)
    assert torch.equal(corrupted.tokens[corrupted.loss_mask], io)
    assert {"ABBA", "BABA"} == set(clean.row_meta["order"])


def test_from_tokens_tensor_does_not_count_padding_as_real_tokens():
    tokens = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    data = TaskDataset.from_tokens(tokens, mask)
    assert data.lengths.tolist() == [3, 5]
    assert TaskDataset.from_tokens(tokens, mask, lengths=[5, 5]).lengths.tolist() == [5, 5]
