"""End to end: the bundled model streams two bundled domains back to back, unlabeled; the
learner detects the one boundary by itself, soon after it happens, and only once."""

import pytest

from herllm.acquire.chunks import Packer
from herllm.acquire.sources import Document
from herllm.config import build_config
from herllm.memory.ledger import read_ledger
from herllm.models.load import BUNDLED
from herllm.run.learner import Learner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BUNDLED["herllm-tiny"] / "config.json").is_file(), reason="bundled model not built"
    ),
]
SEQ = 64
WINDOWS = 240  # per domain: warm-up (100) + room to detect + room for false alarms


def domain_file(tmp_path, domain, tokenizer):
    from herllm.acquire.corpus import load_documents

    docs, tokens = [], 0
    for doc in load_documents(domain, "train"):
        docs.append(doc)
        tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 2  # + bos, eos
        if tokens >= WINDOWS * SEQ:
            break
    windows = sum(
        1 for _ in Packer(tokenizer, SEQ).windows(Document(str(i), d) for i, d in enumerate(docs))
    )
    path = tmp_path / f"{domain}.txt"
    path.write_text("\n\x1e\n".join(docs))
    return path, windows


def test_boundary_between_two_bundled_domains_is_detected_once(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED["herllm-tiny"])
    first, n_first = domain_file(tmp_path, "kjv", tok)
    second, _ = domain_file(tmp_path, "pycode", tok)
    cfg = build_config(None, ["run_dir=" + str(tmp_path / "run"), f"stream.sources=[{first},{second}]",
                              f"stream.seq_len={SEQ}", "shift.detect=true", "train.lr=0.001",
                              "replay.capacity=0"])  # fmt: skip
    with Learner(cfg, show_progress=False) as learner:
        summary = learner.run()
    events = [
        r["event"] for r in read_ledger(tmp_path / "run") if r["type"] == "open" and r["event"]
    ]
    assert summary.shifts == len(events) == 1, events
    delay = events[0]["confirmed_index"] - n_first
    assert 0 <= delay <= 256, (delay, events[0])
