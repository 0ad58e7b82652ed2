"""Self-rehearsal: the base model's own answers, replayed with the loss on the answers only."""

import json

import numpy as np
import pytest

from herllm.config import ConfigError, build_config
from herllm.errors import UserError
from herllm.evaluate.instruct import INSTRUCTIONS
from herllm.memory import rehearsal
from herllm.memory.general import GeneralSampler


def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def test_bundled_instructions_are_not_the_ones_the_benchmark_scores():
    own = rehearsal.read_instructions()
    assert len(own) >= 32 and len(set(own)) == len(own)
    assert not {_norm(s) for s in own} & {_norm(s) for s in INSTRUCTIONS}


def test_instructions_from_a_file_skip_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\nSay hi.\n\n  Count to three.  \n")
    assert rehearsal.read_instructions(str(f)) == ["Say hi.", "Count to three."]
    with pytest.raises(UserError, match="is not a file"):
        rehearsal.read_instructions(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="no instruction"):
        rehearsal.read_instructions(str(tmp_path / "empty.txt"))


def test_windows_train_the_answer_only_and_cut_what_does_not_fit():
    pairs = [([1, 2, 3], [7, 8, 9]), ([1] * 6, [5, 5, 5, 5]), ([1] * 8, [4])]
    w = rehearsal.rehearsal_windows(pairs, seq_len=8, pad_id=0)
    assert len(w) == 2  # the 8-token prompt leaves no room for an answer token
    assert w[0].input_ids.tolist() == [1, 2, 3, 7, 8, 9, 0, 0]
    assert w[0].loss_mask.tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert w[0].attention_mask.tolist() == [True] * 6 + [False] * 2
    assert w[1].input_ids.tolist() == [1] * 6 + [5, 5]  # the answer is cut at seq_len
    assert int(w[1].loss_mask.sum()) == 2


def test_answers_are_generated_once_then_read_back(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herllm.evaluate import instruct

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = []
    real = instruct.greedy_answers
    monkeypatch.setattr(
        instruct, "greedy_answers", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    asks = ["Say hi.", "Name a river."]
    first = rehearsal.rehearsal_pairs(tmp_path, model, tok, asks, new_tokens=6)
    again = rehearsal.rehearsal_pairs(tmp_path, model, tok, asks, new_tokens=6)
    assert len(calls) == 1 and again == first and len(first) == 2
    assert all(0 < len(a) <= 6 for _, a in first)
    assert json.loads((tmp_path / rehearsal.FILE).read_text())["instructions"] == asks
    rehearsal.rehearsal_pairs(tmp_path, model, tok, asks, new_tokens=4)  # other settings: new
    assert len(calls) == 2


def test_batched_answers_are_the_answers_given_one_at_a_time(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herllm.evaluate.instruct import greedy_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    asks = ["Say hi.", "Name a long river in a far country.", "Why?"]  # unequal prompt lengths
    one = greedy_answers(model, tok, asks, new_tokens=8, batch_size=1)
    many = greedy_answers(model, tok, asks, new_tokens=8, batch_size=3)
    assert [p for p, _ in many] == [p for p, _ in one]
    assert [a for _, a in many] == [a for _, a in one]


def test_the_sampler_draws_rehearsal_rows_at_the_share(tiny_model_dir, text_corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = rehearsal.rehearsal_windows([([1, 2], [3, 4])] * 20, seq_len=16, pad_id=0)
    plain = GeneralSampler(tok, 16, [str(text_corpus)], 200, seed=0)
    mixed = GeneralSampler(tok, 16, [str(text_corpus)], 200, seed=0, rehearsal=own,
                           rehearsal_share=0.25)  # fmt: skip
    drawn = [e for _ in range(200) for e in mixed.sample(4)]
    share = np.mean([e.key.startswith("rehearsal#") for e in drawn])
    assert len(drawn) == 800 and 0.2 < share < 0.3
    assert not any(e.key.startswith("rehearsal#") for _ in range(50) for e in plain.sample(4))


def test_rehearsal_needs_general_rows():
    with pytest.raises(ConfigError, match="replay.general_ratio"):
        build_config(None, ["replay.rehearsal=always", "replay.general_ratio=0"])


def test_answers_are_no_longer_than_a_window_leaves_room_for(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herllm.evaluate.instruct import prompt_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    asks = ["Say hi.", "Name a long river in a far country."]
    room = 3 + min(len(prompt_ids(tok, a)) for a in asks)
    pairs = rehearsal.rehearsal_pairs(tmp_path, model, tok, asks, new_tokens=50, seq_len=room)
    assert pairs and all(len(a) <= 3 for _, a in pairs)
    tight = min(len(prompt_ids(tok, a)) for a in asks)  # no room for one answer token
    assert rehearsal.rehearsal_pairs(tmp_path / "x", model, tok, asks, 50, seq_len=tight) == []
