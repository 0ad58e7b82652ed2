"""A micro benchmark end to end: tiny model, 2 domains, references + 2 strategies."""

import json
import random

import pytest

from herllm.bench.runner import BenchConfig, domain_orders, run_bench

pytestmark = pytest.mark.slow


def make_stream_dir(root):
    rng = random.Random(0)
    vocab = {
        "alpha": "river lamp ledger valley keeper window".split(),
        "beta": "def return class self import yield".split(),
    }
    for name, words in vocab.items():
        (root / name).mkdir(parents=True)
        for split, n in (("train", 60), ("test", 10)):
            docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(n)]
            (root / name / f"{split}.txt").write_text("\n\x1e\n".join(docs))
    probes = [{"id": f"alpha/cont/seen/{i}", "domain": "alpha", "kind": "continuation", "split": "seen",
               "prompt": "river lamp", "choices": ["ledger valley", "def return", "class self", "import yield"],
               "answer": 0} for i in range(3)]  # fmt: skip
    (root / "alpha" / "probes.jsonl").write_text("\n".join(json.dumps(p) for p in probes))
    (root / "general").mkdir()  # general held-out text: no train.txt, so not a stream domain
    (root / "general" / "test.txt").write_text("the keeper writes the day into the ledger. " * 40)
    return root


def test_micro_bench_writes_well_formed_results(tmp_path, tiny_model_dir, monkeypatch):
    from herllm import strategies

    future = strategies.Strategy(
        "future", "not built yet", missing="needs work that has not landed"
    )
    monkeypatch.setitem(strategies.STRATEGIES, "future", future)
    stream = make_stream_dir(tmp_path / "stream")
    bc = BenchConfig(stream_dir=str(stream), strategies=["base", "joint", "naive", "replay", "her", "future"], orders=1,
                     tokens_per_domain=1500, evals_per_domain=2, eval_windows=4, probe_items=3, intrinsic=True,
                     model=str(tiny_model_dir), seq_len=32, batch_size=4, lr=0.01, lora_r=4, out=str(tmp_path / "out"),
                     overrides=["shift.warmup=16", "shift.cooldown=16"])  # fmt: skip
    results = run_bench(bc, progress=lambda m: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["domains"] == ["alpha", "beta"] and saved["config"]["tokens_per_domain"] == 1500
    runs = {r["strategy"]: r for r in saved["runs"]}
    assert runs["future"]["status"] == "not_implemented" and "loss_matrix" not in runs["future"]
    her = runs["her"]
    assert her["status"] == "ok", her.get("reason")
    assert her["cost"]["adapters"] == 1 + her["cost"]["adapters_grown"]
    routing = her["routing"]  # expanding with learned routing: figures against oracle routing
    assert set(routing["oracle"]) == {"alpha", "beta"} and len(routing["confusion"]) == 2
    assert (
        sum(map(sum, routing["confusion"])) == 2 * 4
    )  # 4 held-out windows per domain, each routed once
    assert 0.0 <= routing["accuracy"] <= 1.0 and routing["oracle_gap"] == routing["oracle_gap"]
    for name in ("base", "joint", "naive", "replay"):
        r = runs[name]
        assert r["status"] == "ok", r.get("reason")
        L = r["loss_matrix"]
        assert len(L) == 3 and all(len(row) == 2 for row in L)
        assert r["cost"]["wall_seconds"] >= 0 and r["intrinsic"]["cka"]
    assert runs["base"]["loss_matrix"][2] == runs["base"]["loss_matrix"][0]  # untrained
    naive = runs["naive"]
    assert naive["loss_matrix"][1][0] < naive["loss_matrix"][0][0]  # learned domain 1
    assert naive["loss_matrix"][2][1] < naive["loss_matrix"][0][1]  # learned domain 2
    assert len(naive["trace"]) == 5
    assert naive["switch_steps"] == [0, naive["trace"][2]["step"]]  # steps, each with an evaluation
    assert naive["metrics"]["forgetting_loss"] is not None
    assert naive["cost"]["tokens_trained"] >= 2 * 1500 * 0.9
    assert runs["replay"]["cost"]["buffer_rows"] > 0 and naive["cost"]["buffer_rows"] == 0
    assert set(results["summary"]) == {"base", "joint", "naive", "replay", "her"}
    P = naive["probe_matrix"]  # alpha has 3 probe items; beta has none (NaN)
    assert len(P) == 3 and all(0.0 <= row[0] <= 1.0 for row in P)


def test_domain_orders_are_distinct_permutations():
    orders = domain_orders(["a", "b", "c", "d"], 3, seed=0)
    assert orders[0] == ["a", "b", "c", "d"]
    assert len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders)


def test_joint_file_token_count_survives_a_rerun(tmp_path):
    from herllm.bench.data import BenchData

    files = {}
    for d in ("a", "b"):
        files[d] = tmp_path / f"{d}.train.txt"
        files[d].write_text(f"{d} one\n\x1e\n{d} two")
    tokens = {files["a"]: 10, files["b"]: 7}
    first = BenchData(["a", "b"], files, dict(tokens), suite=None, root=tmp_path)
    path = first.joint_file(seed=0)
    again = BenchData(["a", "b"], files, dict(tokens), suite=None, root=tmp_path)  # file exists now
    assert again.joint_file(seed=0) == path and again.tokens[path] == 17
    assert sorted(path.read_text().split("\n\x1e\n")) == ["a one", "a two", "b one", "b two"]
