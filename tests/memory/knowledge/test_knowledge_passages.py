"""Passages are exact slices, sized by words, cut at paragraph and sentence boundaries."""

from __future__ import annotations

import pytest

from herllm.errors import UserError
from herllm.memory.knowledge import split_passages


def _sentence(i: int, words: int = 10) -> str:
    return " ".join([f"w{i}"] * (words - 1)) + " end."


def test_passages_are_exact_slices_within_word_limits(fk10):
    for doc in fk10:
        text = doc["train_context"]
        passages = split_passages(text)
        assert passages and passages[0].start == 0
        for i, p in enumerate(passages):
            assert text[p.start : p.end] == p.text
            least = 100 if i < len(passages) - 1 else 100 // 2  # a shorter tail joins the last
            assert least <= len(p.text.split()) <= 200 + 100 // 2
            assert p.text.endswith((".", "!", "?", '"', "\u201d"))  # ends at a sentence end
        assert [p.start for p in passages] == sorted(p.start for p in passages)
        covered = " ".join(p.text for p in passages).split()
        assert covered == text.split()  # nothing lost, nothing repeated


def test_paragraph_end_closes_a_passage_once_it_is_long_enough():
    para_a = " ".join(_sentence(i) for i in range(12))  # 120 words
    para_b = " ".join(_sentence(i) for i in range(12, 16))  # 40 words
    para_c = " ".join(_sentence(i) for i in range(16, 28))  # 120 words
    text = f"{para_a}\n\n{para_b}\n\n{para_c}"
    passages = split_passages(text, min_words=100, max_words=200)
    assert [len(p.text.split()) for p in passages] == [120, 160]
    assert passages[0].text == para_a
    assert passages[1].text == f"{para_b}\n\n{para_c}"  # too short alone: joins the next


def test_long_sentence_is_cut_by_words_and_short_tail_is_merged():
    text = " ".join(["word"] * 450) + "."
    passages = split_passages(text, min_words=100, max_words=200)
    assert [len(p.text.split()) for p in passages] == [200, 200, 50]
    tail = " ".join(_sentence(i) for i in range(15)) + " Short tail here."
    sizes = [len(p.text.split()) for p in split_passages(tail, min_words=60, max_words=120)]
    assert sizes == [120, 33]  # 33 >= 60 // 2 is not merged ...
    merged = " ".join(_sentence(i) for i in range(12)) + " Tiny tail."
    assert [len(p.text.split()) for p in split_passages(merged, 100, 120)] == [122]  # ... 2 is


def test_bad_sizes_are_refused():
    with pytest.raises(UserError, match="need 0 < min <= max"):
        split_passages("Some text.", min_words=300, max_words=200)
