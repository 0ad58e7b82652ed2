"""Tests for herllm.evaluate.intrinsic: entropy, NLL, CKA, distinct-n, repetition."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from herllm.evaluate import intrinsic as ig

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def probe_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=gen)  # (B, T)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding on the last row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a "prompt" that is not scored
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def split_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


# ---------------------------------------------------------------- entropy and NLL


def test_entropy_and_nll_are_log_vocab_for_constant_logits() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits == 0 everywhere -> uniform prediction
    batches = probe_batches()
    assert ig.mean_token_entropy(model, batches) == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert ig.mean_token_nll(model, batches) == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_entropy_matches_manual_masked_mean_and_ignores_batching() -> None:
    model = tiny_llama()
    batch = probe_batches()[0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    ent = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    scored = batch["labels"][:, 1:] != -100
    expected = ent[scored].mean().item()
    # rows: 9 + 6 (prompt 0..3 unscored, so targets 4..9) + 6 (targets 1..6) = 21 scored tokens
    assert int(scored.sum()) == 9 - 3 + 9 + 6
    assert ig.mean_token_entropy(model, [batch]) == pytest.approx(expected, rel=1e-5)
    # token-weighted across batches: one row per batch gives the same mean
    assert ig.mean_token_entropy(model, split_rows(batch)) == pytest.approx(expected, rel=1e-5)
    # a trained-from-scratch random model is not uniform
    assert expected < math.log(VOCAB)


def test_nll_matches_hf_loss_and_restores_training_mode() -> None:
    model = tiny_llama()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.clone()}
    with torch.no_grad():
        model.eval()
        hf_loss = model(input_ids=ids, labels=ids).loss.item()
        model.train()
    assert ig.mean_token_nll(model, [batch]) == pytest.approx(hf_loss, rel=1e-5)
    assert model.training


def test_without_labels_scores_tokens_by_attention_mask() -> None:
    model = tiny_llama()
    batch = probe_batches()[0]
    unlabeled = {k: batch[k] for k in ("input_ids", "attention_mask")}
    as_labels = dict(
        unlabeled, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    )
    assert ig.mean_token_nll(model, [unlabeled]) == pytest.approx(
        ig.mean_token_nll(model, [as_labels])
    )
    # and differs from the labelled batch, whose prompt positions are not scored
    assert ig.mean_token_nll(model, [unlabeled]) != pytest.approx(ig.mean_token_nll(model, [batch]))


def test_all_tokens_ignored_raises() -> None:
    ids = torch.zeros((1, 4), dtype=torch.long)
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    with pytest.raises(ValueError, match="no scored tokens"):
        ig.mean_token_entropy(tiny_llama(), [batch])


def test_samples_to_batches_masks_prompt_and_padding() -> None:
    batches = ig.samples_to_batches(
        [[5, 6, 7, 8], [9, 10]], 2, pad_token_id=0, prompt_lengths=[2, 1]
    )
    (b,) = batches
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert len(ig.samples_to_batches([[1]] * 5, 2, pad_token_id=0)) == 3


# ---------------------------------------------------------------- CKA


def random_matrix(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_hand_computed_one_dimensional() -> None:
    # centred x = [-1, 0, 1], y = [1, 0, 2] - 1 = [0, -1, 1]
    # ||y^T x||^2 = 1^2 = 1; ||x^T x|| = 2; ||y^T y|| = 2 -> CKA = 1 / (2 * 2) = 0.25 (= corr^2)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert ig.linear_cka(x, y) == pytest.approx(0.25)


def test_cka_identity_invariances_and_unrelated() -> None:
    x = random_matrix(500, 12, seed=0)
    q, _ = torch.linalg.qr(random_matrix(12, 12, seed=1))  # orthogonal (12, 12)
    assert ig.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ig.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert ig.linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert ig.linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-10)  # centring
    # unrelated: E ~ sqrt(D1 D2) / N ~ 0.02 here
    unrelated = ig.linear_cka(x, random_matrix(500, 8, seed=2))
    assert unrelated < 0.1
    # partly related sits in between
    mixed = ig.linear_cka(x, x[:, :6] + random_matrix(500, 6, seed=3))
    assert unrelated < mixed < 1.0


def test_cka_degenerate_and_bad_shapes() -> None:
    assert math.isnan(ig.linear_cka(torch.ones(5, 3), random_matrix(5, 3, seed=0)))
    with pytest.raises(ValueError, match="equal N"):
        ig.linear_cka(torch.zeros(4, 2), torch.zeros(5, 2))


def test_collect_hidden_states_shapes_and_layerwise_cka() -> None:
    model = tiny_llama(seed=0)
    batches = probe_batches()
    tokens = ig.collect_hidden_states(model, batches, pooling="token")
    pooled = ig.collect_hidden_states(model, batches, pooling="mean")
    assert len(tokens) == 3  # embeddings + 2 layers
    assert tokens[1].shape == (10 + 10 + 7, 32)  # real tokens by attention mask
    assert pooled[1].shape == (3, 32)
    # mean pooling over the padded row only averages its 7 real tokens
    assert torch.allclose(pooled[1][2], tokens[1][20:27].mean(0), atol=1e-5)
    same = ig.layerwise_cka(tokens, ig.collect_hidden_states(model, batches))
    assert same == pytest.approx([1.0] * 3, abs=1e-9)
    other = ig.layerwise_cka(ig.collect_hidden_states(tiny_llama(seed=1), batches), tokens)
    assert all(c < 0.99 for c in other)
    with pytest.raises(ValueError, match="pooling"):
        ig.collect_hidden_states(model, batches, pooling="max")  # type: ignore[arg-type]


# ---------------------------------------------------------------- generated-sample quality

SAMPLES = [[1, 2, 1, 2, 3], [1, 2]]


def test_distinct_n_hand_counted() -> None:
    # unigrams: 1,2,1,2,3,1,2 -> 7 total, {1,2,3} -> 3/7
    assert ig.distinct_n(SAMPLES, 1) == pytest.approx(3 / 7)
    # bigrams: (1,2),(2,1),(1,2),(2,3) + (1,2) -> 5 total, {(1,2),(2,1),(2,3)} -> 3/5
    assert ig.distinct_n(SAMPLES, 2) == pytest.approx(3 / 5)
    # trigrams: (1,2,1),(2,1,2),(1,2,3); the second sample is too short -> 3/3
    assert ig.distinct_n(SAMPLES, 3) == pytest.approx(1.0)
    assert math.isnan(ig.distinct_n([[1, 2]], 3))


def test_repetition_rate_hand_counted() -> None:
    # n=2: sample 1 bigrams (1,2),(2,1),(1,2)*,(2,3) -> 1 repeat; sample 2 (1,2) is its first
    # occurrence in that sample (cross-sample repeats do not count) -> 1 / 5
    assert ig.repetition_rate(SAMPLES, n=2) == pytest.approx(1 / 5)
    # n=4 on a loop: 4-grams 5678, 6785, 7856, 8567, 5678*, 6785* -> 2 / 6
    assert ig.repetition_rate([[5, 6, 7, 8, 5, 6, 7, 8, 5]]) == pytest.approx(1 / 3)
    assert ig.repetition_rate([[1, 2, 3, 4, 5, 6]]) == 0.0
    assert math.isnan(ig.repetition_rate([[1, 2, 3]]))
    assert ig.repetition_rate([["the", "cat", "the", "cat"]], n=2) == pytest.approx(1 / 3)
