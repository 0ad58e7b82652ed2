"""The chat-learning benchmark's framing (benchmarks/bench_chat_learning.py): how a probe becomes
a question and a document becomes told messages, checked against the server's fact rule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from herllm.bench.knowledge import load_documents
from herllm.memory.knowledge.prompt import HEADER
from herllm.serve.exchange import FACT_MAX_CHARS, is_statement

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_chat_learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_chat_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_question_golden_and_never_stored(bench):
    q = bench.question('Malm Town (, "Northern Hill town") is one of the 45  municipalities\n in')
    assert q == ('Continue the text: "Malm Town (, "Northern Hill town") is one of the 45 '
                 'municipalities in ..."?')  # fmt: skip
    for d in load_documents("")[:3]:
        for p in d["mem_input"] + d["gen_input"] + d["hard_gen_input"]:
            assert not is_statement(bench.question(p))  # a question is never stored as a fact


def test_tell_messages_are_stored_statements_covering_the_document(bench):
    docs = load_documents("")
    for d in docs[:10]:
        text = d["train_context"]
        msgs = bench.tell_messages(text)
        assert all(m.startswith(bench.TELL_PREFIX) for m in msgs)
        assert all(is_statement(m) and len(m) <= FACT_MAX_CHARS for m in msgs)
        told = " ".join(m.removeprefix(bench.TELL_PREFIX) for m in msgs)
        assert told.split() == text.split()  # every word, in order, nothing else
    whole = [bench.tell_messages(d["train_context"], "whole") for d in docs]
    assert all(len(w) == 1 for w in whole)
    assert all(is_statement(w[0]) for w in whole)  # stored too: long ones as passages
    assert sum(len(w[0]) > FACT_MAX_CHARS for w in whole) == 62


def test_tell_messages_cut_a_long_passage_at_sentence_ends(bench):
    text = " ".join(
        f"Sentence number {i} says something about the Malm Town wind farms." for i in range(40)
    )
    msgs = bench.tell_messages(text, limit=300)
    assert len(msgs) > 2 and all(len(m) <= 300 and m.endswith(".") for m in msgs)


def test_in_context_system_is_the_facts_block(bench):
    assert bench.in_context_system("A  b\nc.") == f"{HEADER}\n- A b c."
