"""Answers from a run: its knowledge store's passages in the prompt, chat through the template,
routing on the user's own input."""

from __future__ import annotations

import pytest
import torch

from herllm.cli import main
from herllm.config import build_config
from herllm.errors import UserError
from herllm.infer.adapted import AdaptedModel
from herllm.infer.knowledge import RunKnowledge
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.models.chat import apply_chat
from herllm.run.learner import Learner

DOCS = [
    "The lighthouse of Varn was built by Osric Tell in 1821 from grey harbour stone.",
    "Merel Dune keeps bees on the roof of the old mill and sells the honey in spring.",
    "The ferry to Skellan leaves at dawn and returns when the tide turns in the evening.",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A two-step run that ingested DOCS into its store (BM25 only)."""
    root = tmp_path_factory.mktemp("answers")
    (root / "s.txt").write_text("\n\x1e\n".join(DOCS))
    cfg = build_config(None, [f"model.name_or_path={tiny_model_dir}", f"run_dir={root / 'run'}",
                              f"stream.sources=[{root / 's.txt'}]", "stream.seq_len=16",
                              "train.batch_size=2", "train.max_steps=2", "knowledge.ingest=true",
                              "knowledge.encoder=none", "knowledge.min_words=4"])  # fmt: skip
    with Learner(cfg, show_progress=False) as learner:
        learner.run()
    return root / "run"


def capture(m: AdaptedModel) -> list[tuple]:
    """Record what `_continue` is given: (model input text, routing text)."""
    seen, inner = [], m._continue

    def spy(enc, route, *args):
        text = m.tokenizer.batch_decode(enc["input_ids"], skip_special_tokens=False)
        routed = None if route is None else m.tokenizer.batch_decode(route["input_ids"])
        seen.append((text, routed))
        return inner(enc, route, *args)

    m._continue = spy
    return seen


def test_generate_puts_the_retrieved_passages_in_front_and_routes_on_the_prompt(run):
    m = AdaptedModel.from_run(run)
    seen = capture(m)
    prompt = "Who built the lighthouse of Varn?"
    out = m.generate(prompt, max_new_tokens=4)
    assert isinstance(out, str)
    [hits] = m.last_retrieval
    assert hits and "Osric Tell" in hits[0].item.text and hits[0].item.doc_id.endswith("s.txt#0")
    [(texts, routed)] = seen
    assert texts[0].startswith("Known facts:\n- The lighthouse of Varn") and prompt in texts[0]
    assert routed == [prompt]  # the adapter is chosen from the prompt, not the facts


def test_without_hits_or_with_knowledge_off_the_answer_is_unchanged(run):
    off = AdaptedModel.from_run(run, knowledge=False)
    assert off.knowledge is None
    on = AdaptedModel.from_run(run)
    prompt = "zzz qqq"  # nothing in the store matches
    assert on.generate([prompt], max_new_tokens=6) == off.generate([prompt], max_new_tokens=6)
    assert on.last_retrieval == [[]] and off.last_retrieval == [[]]
    enc = off._encode([prompt])
    direct = off.model.generate(**enc, max_new_tokens=6, do_sample=False,
                                pad_token_id=off.tokenizer.pad_token_id)  # fmt: skip
    new = direct[:, enc["input_ids"].shape[1] :]
    assert off.generate(prompt, max_new_tokens=6) == off.tokenizer.decode(
        new[0], skip_special_tokens=True
    )


def test_user_scopes_see_their_own_passages_and_the_runs(run):
    with KnowledgeStore(run / "knowledge.sqlite") as store:
        store.add(
            "Alice's cat Mervyn sleeps on the lighthouse steps.", scope=Scope("user", "alice")
        )
    m = AdaptedModel.from_run(run)
    texts = lambda hits: " ".join(h.item.text for h in hits)  # noqa: E731
    assert "Mervyn" in texts(m.retrieve("Mervyn the cat sleeps", user="alice"))
    assert "Mervyn" not in texts(m.retrieve("Mervyn the cat sleeps", user="bob"))
    assert "Mervyn" not in texts(m.retrieve("Mervyn the cat sleeps"))
    assert "Osric" in texts(m.retrieve("Who built the lighthouse of Varn?", user="bob"))
    assert len(m.retrieve("lighthouse Varn Mervyn", user="alice", k=1)) == 1


def test_chat_without_a_template_is_one_line_naming_smollm2(run):
    m = AdaptedModel.from_run(run)
    with pytest.raises(UserError, match=r"no chat template.*--model smollm2-135m") as err:
        m.chat([{"role": "user", "content": "hello"}])
    assert "\n" not in str(err.value)


def test_chat_renders_the_template_with_passages_in_the_system_message(
    tiny_model_dir, chatml_tokenizer, tmp_path
):
    from transformers import AutoModelForCausalLM

    tok = chatml_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    store = KnowledgeStore(tmp_path / "k.sqlite")
    store.ingest_document(DOCS[1], "bees.txt", Scope("run", "r"), min_words=4)
    m = AdaptedModel(
        model, tok, None, knowledge=RunKnowledge(store, Scope("run", "r"), 3, 0.0, 512)
    )
    seen = capture(m)
    messages = [{"role": "user", "content": "Where does Merel Dune keep bees?"}]
    reply = m.chat(messages, max_new_tokens=5)
    assert isinstance(reply, str) and "<|im_start|>" not in reply
    [(texts, routed)] = seen
    assert texts[0].startswith("<|im_start|>system\nKnown facts:\n- Merel Dune keeps bees")
    assert texts[0].endswith("Where does Merel Dune keep bees?<|im_end|>\n<|im_start|>assistant\n")
    assert routed == [apply_chat(tok, messages)]  # routing reads the conversation alone
    assert "Merel" in m.last_retrieval[0][0].item.text


def test_the_cli_generates_with_and_without_knowledge(run, capsys):
    torch.manual_seed(0)
    assert main(["generate", "--run", str(run), "--max-new-tokens", "3",
                 "Who built the lighthouse of Varn?"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert out.startswith("[default] Who built the lighthouse of Varn?")
    assert "[knowledge] 1 passage(s)" in err or "[knowledge] 2 passage(s)" in err
    assert main(["generate", "--run", str(run), "--no-knowledge", "--max-new-tokens", "3",
                 "Who built the lighthouse of Varn?"]) == 0  # fmt: skip
    assert "[knowledge]" not in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "--chat", "hello"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err
