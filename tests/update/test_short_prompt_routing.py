"""End to end: after `her` learns two bundled domains with growth, a short question (a few words,
far from every key fit on training windows) is answered by the adapter of its domain, not by the
base model."""

import pytest

from herllm.cli import main
from herllm.config import build_config
from herllm.infer.adapted import AdaptedModel
from herllm.models.load import BUNDLED
from herllm.run.learner import Learner
from herllm.strategies import strategy_overrides
from herllm.update import adapters as ad

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BUNDLED["herllm-tiny"] / "config.json").is_file(), reason="bundled model not built"
    ),
]
SEQ, WINDOWS = 64, 200  # per domain: the detector's warm-up (100) and room to detect the shift
QUESTIONS = {"kjv": "Thou shalt not kill.", "pycode": "import os"}


def domain_file(tmp_path, domain, tokenizer):
    from herllm.acquire.corpus import load_documents

    docs, tokens = [], 0
    for doc in load_documents(domain, "train"):
        docs.append(doc)
        tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 2
        if tokens >= WINDOWS * SEQ:
            break
    path = tmp_path / f"{domain}.txt"
    path.write_text("\n\x1e\n".join(docs))
    return path


def test_a_short_question_is_answered_by_its_domains_adapter(tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED["herllm-tiny"])
    files = ",".join(str(domain_file(tmp_path, d, tok)) for d in QUESTIONS)
    run = tmp_path / "run"
    cfg = build_config(None, [*strategy_overrides("her"), f"run_dir={run}", f"stream.sources=[{files}]",
                              f"stream.seq_len={SEQ}", "train.lr=0.001"])  # fmt: skip
    with Learner(cfg, show_progress=False) as learner:
        assert learner.run().shifts == 1
    m = AdaptedModel.from_run(run)
    assert list(m.bank.adapters) == ["default", "a001"] and m.bank.fallback == "nearest"
    # each question lies beyond the fallback radius of its unit's key: the base used to answer it
    keys = [*m.bank.keys.values(), m.open_key]
    for domain, question in QUESTIONS.items():
        reps = ad.base_reps(m.model, [m._encode([question])]).numpy()
        ratio = m.bank.nearest(reps, keys)[2]
        assert ratio[0] > m.bank.fallback_radius, (domain, ratio)
    assert m.routes(list(QUESTIONS.values())[:1]) == ["default"]  # kjv trained the first adapter
    assert m.routes(list(QUESTIONS.values())[1:]) == ["a001"]
    assert main(["generate", "--run", str(run), "--max-new-tokens", "4", QUESTIONS["pycode"]]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("[a001] import os")
