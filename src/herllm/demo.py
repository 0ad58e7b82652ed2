"""`herllm demo` (and `make demo`): the bundled model adapts to a short bundled stream.

Three HER-Stream domains, a few hundred kB of text each, stream one after another with no
labels; held-out loss on each domain's test split is measured before and after, so the table
shows both what was learned and what was kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEMO_DOMAINS = ("austen", "pycode", "kjv")


def write_domain_file(path: Path, docs: list[str], max_chars: int) -> None:
    """Whole documents, in corpus order, up to about max_chars, record-separated."""
    picked, size = [], 0
    for doc in docs:
        if size >= max_chars:
            break
        picked.append(doc.replace("\x1e", " "))
        size += len(doc)
    path.write_text("\n\x1e\n".join(picked), encoding="utf-8")


def build_demo_stream(root: Path, train_chars: int, test_chars: int) -> tuple[list[str], list[str]]:
    from herllm.acquire.corpus import load_documents

    stream, heldout = root / "stream", root / "heldout"
    for d in (stream, heldout):
        d.mkdir(parents=True, exist_ok=True)
    sources, evals = [], []
    for i, domain in enumerate(DEMO_DOMAINS):
        train = stream / f"{i + 1:02d}-{domain}.txt"
        test = heldout / f"{domain}.txt"
        write_domain_file(train, load_documents(domain, "train"), train_chars)
        write_domain_file(test, load_documents(domain, "test"), test_chars)
        sources.append(str(train))
        evals.append(str(test))
    return sources, evals


def run_demo(
    root: str = "runs", train_chars: int = 120_000, test_chars: int = 40_000, quiet: bool = False
):
    """Build the demo stream under `root`, adapt the bundled model on it, return the summary."""
    from herllm.config import build_config
    from herllm.run.learner import Learner

    root_path = Path(root)
    data_dir, run_dir = root_path / "demo-data", root_path / "demo"
    for d in (data_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    sources, evals = build_demo_stream(data_dir, train_chars, test_chars)
    cfg = build_config(
        None,
        [
            f"run_dir={run_dir}",
            "stream.sources=[" + ",".join(sources) + "]",
            "eval.files=[" + ",".join(evals) + "]",
            "eval.every_steps=50",
            "replay.ratio=0.25",
            "train.lr=0.001",
        ],
    )
    with Learner(cfg, show_progress=not quiet) as learner:
        return learner.run()
