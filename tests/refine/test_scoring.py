import torch
from transformers import AutoModelForCausalLM

from herllm.refine.scoring import mean_nll, sample_nll, score_batch, token_stats


def batch_of(ids, mask_from=0):
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:, :mask_from] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_token_stats_match_hf_loss_and_direct_entropy(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = batch_of([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]], mask_from=3)
    with torch.no_grad():
        out = model(**batch)
    nll, ent, count = token_stats(out.logits, batch["labels"])
    assert count.tolist() == [5, 5]
    assert torch.allclose(nll.mean(), out.loss, atol=1e-5)  # equal counts: mean of means = HF mean
    assert torch.allclose(sample_nll(out.logits, batch["labels"]), nll, atol=1e-5)
    logp = torch.log_softmax(out.logits[:, 2:-1], -1)  # the predicting positions of labels 3..7
    direct = -(logp.exp() * logp).sum(-1).mean(-1)
    assert torch.allclose(ent, direct, atol=1e-5)
    vocab = out.logits.shape[-1]
    assert (ent > 0).all() and (ent <= torch.log(torch.tensor(float(vocab))) + 1e-5).all()


def test_score_batch_and_mean_nll_agree(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    batch = batch_of([[1, 5, 9, 13, 17, 21], [3, 7, 11, 15, 19, 23]])
    scores = score_batch(model, batch)
    assert model.training  # the pass restores the mode it found
    assert scores.reps.shape == (2, model.config.hidden_size) and scores.tokens == 12
    assert abs(float(scores.nll.mean()) - mean_nll(model, [batch])[0]) < 1e-5


def test_token_stats_in_row_blocks_equals_one_pass(monkeypatch):
    """A large vocabulary is scored in blocks of rows; every row's result is unchanged."""
    from herllm.refine import scoring

    torch.manual_seed(0)
    logits, labels = torch.randn(7, 12, 50), torch.randint(0, 50, (7, 12))
    labels[2, :5] = -100
    whole = scoring.token_stats(logits, labels)
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 2 * 12 * 50)  # blocks of 2 rows
    blocks = scoring.token_stats(logits, labels)
    for a, b in zip(whole, blocks, strict=True):
        assert torch.equal(a, b)


def test_without_entropy_the_nll_is_bit_for_bit_the_same(monkeypatch):
    """`mean_nll` and scoring without a shift detector skip the entropy; the NLL is unchanged."""
    from herllm.refine import scoring

    torch.manual_seed(0)
    logits, labels = torch.randn(5, 12, 50), torch.randint(0, 50, (5, 12))
    labels[1, :4] = -100
    nll, ent, count = scoring.token_stats(logits, labels)
    nll_only, nan, count_only = scoring.token_stats(logits, labels, entropy=False)
    assert torch.equal(nll, nll_only) and torch.equal(count, count_only)
    assert torch.isnan(nan).all() and torch.isfinite(ent).all()
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 2 * 12 * 50)  # in row blocks as well
    assert torch.equal(scoring.token_stats(logits, labels, entropy=False)[0], nll)
