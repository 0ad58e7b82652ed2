"""Self-rehearsal: the base model's own answers, replayed with the loss on the answers only."""

import json

import pytest

from herllm.config import ConfigError, build_config
from herllm.errors import UserError
from herllm.evaluate.instruct import INSTRUCTIONS
from herllm.memory import rehearsal


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


def test_the_sampler_draws_uniformly_and_resumes_its_draws():
    own = rehearsal.rehearsal_windows([([1, 2], [3, i]) for i in range(20)], seq_len=8, pad_id=0)
    a = rehearsal.RehearsalSampler(own, seed=0)
    a.sample(3)
    saved = a.state_dict()
    after = [e.key for e in a.sample(5)]
    b = rehearsal.RehearsalSampler(own, seed=0)
    b.load_state_dict(saved)
    assert [e.key for e in b.sample(5)] == after and len(set(after)) == 5
    assert all(k.startswith(rehearsal.KEY) for k in after)


def test_rehearsal_rows_count_against_the_new_ones():
    with pytest.raises(ConfigError, match="replay.rehearsal_ratio"):
        build_config(None, ["train.batch_size=8", "replay.ratio=0.5", "replay.general_ratio=0.25",
                            "replay.rehearsal=always", "replay.rehearsal_ratio=0.25"])  # fmt: skip
    build_config(None, ["train.batch_size=8", "replay.ratio=0.5", "replay.general_ratio=0.25",
                        "replay.rehearsal=never"])  # fmt: skip


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


def test_chat_mode_rehearses_only_a_model_with_a_chat_template(tiny_model_dir, chatml_tokenizer):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert rehearsal.active("chat", chatml_tokenizer) and not rehearsal.active("chat", plain)
    assert rehearsal.active("always", plain) and not rehearsal.active("never", chatml_tokenizer)
