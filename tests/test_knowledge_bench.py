"""`herllm bench --scenario knowledge --quick` end to end, and `herllm knowledge consolidate
--run RUN` on a real run directory (consolidate, then undo, as checkpoints)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from herllm.bench.knowledge import load_documents
from herllm.cli import main
from herllm.errors import UserError


def test_data_file_is_checked_and_the_bundled_half_ships_with_its_license(tmp_path):
    docs = load_documents("")
    assert len(docs) == 65 and len(docs[0]["gen_input"]) == 5
    root = Path(str(resources.files("herllm"))) / "assets/fictional-knowledge"
    assert (root / "LICENSE").is_file() and "Apache" in (root / "SOURCE.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"train_context": "x", "mem_input": []}]))
    with pytest.raises(UserError, match="record 0 lacks mem_target"):
        load_documents(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(docs[:4]))
    assert load_documents(str(good)) == docs[:4]


@pytest.mark.slow
def test_quick_knowledge_scenario_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--scenario", "knowledge", "--quick", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["row"]: r for r in results["runs"]}
    assert list(rows) == ["base", "in-context", "naive-1", "naive-2", "replay-1", "replay-2",
                          "her-2", "knowledge", "knowledge+consolidate", "consolidated",
                          "passage-ft"]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("reason") for r in rows.values()]
    assert [q["docs_seen"] for q in rows["knowledge"]["quarters"]] == [1, 2, 3, 4]
    assert rows["knowledge"]["final"]["recall@3"] == 1.0  # 4 documents, BM25: always found
    assert rows["naive-2"]["tokens_trained"] > rows["naive-1"]["tokens_trained"] > 0
    assert rows["base"]["final"]["mem_nll"] > 0 and rows["knowledge"]["latency"]["plain"] > 0
    ledger = out / "runs/order0/knowledge/ledger.jsonl"
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert entries and all(e["type"] == "consolidation" for e in entries)
    report = (out / "report.md").read_text()
    assert "| knowledge+consolidate |" in report and "## Targets" in report


@pytest.mark.slow
def test_knowledge_consolidate_cli_on_a_run(tmp_path, capsys):
    text = tmp_path / "stream.txt"
    text.write_text("The river carries what the mountain gives it. " * 60, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["adapt", "--model", "herllm-tiny", "--run-dir", str(run), "--quiet",
                 "--max-steps", "2", str(text)]) == 0  # fmt: skip
    fact = "Zorvath Keep was founded by the weaver Ilsa Marrow in 1742. Its bell is Old Tamsin."
    common = ["--run", str(run), "--run-scope", "r"]
    assert main(["knowledge", "add", fact, "--encoder", "none", *common]) == 0
    capsys.readouterr()
    code = main(["knowledge", "consolidate", "--min-retrievals", "0", "--tolerance", "10",
                 "--json", *common])  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["accepted"] and out["entry"] == "cons-0001"
    assert main(["knowledge", "consolidate", "--undo", "cons-0001", *common]) == 0
    assert "rolled back cons-0001" in capsys.readouterr().out
