"""Benchmark data: each domain's training text cut to the token budget, and the held-out sets.

Sources: the bundled HER-Stream corpus (`herllm.acquire.corpus`) or a user folder laid out as
`DIR/<domain>/{train,test}.txt` (documents separated by lines holding only U+001E; a file
without separators is one document) with an optional `probes.jsonl` per domain.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from herllm.acquire.sources import split_records
from herllm.bench.suite import EvalSuite, pack_batches
from herllm.errors import UserError


@dataclass
class BenchData:
    domains: list[str]
    train_files: dict[str, Path]
    tokens: dict[Path, int]
    """Tokens of each training file as the packer counts them (bos/eos included)."""
    suite: EvalSuite
    root: Path

    def joint_file(self, seed: int) -> Path:
        """All domains' budgeted training documents, shuffled together (the joint upper bound)."""
        path = self.root / f"joint-seed{seed}.txt"
        if not path.exists():
            docs = []
            for d in self.domains:
                docs.extend(split_records(self.train_files[d].read_text(encoding="utf-8")))
            random.Random(seed).shuffle(docs)
            path.write_text("\n\x1e\n".join(docs), encoding="utf-8")
        self.tokens[path] = sum(self.tokens[self.train_files[d]] for d in self.domains)
        return path


def _read_docs(domain: str, split: str, stream_dir: str) -> list[str]:
    if not stream_dir:
        from herllm.acquire.corpus import load_documents

        return load_documents(domain, split)
    path = Path(stream_dir) / domain / f"{split}.txt"
    if not path.is_file():
        raise UserError(
            f"{path} is missing; --stream-dir needs DIR/<domain>/{{train,test}}.txt for every domain"
        )
    return split_records(path.read_text(encoding="utf-8"))


def _read_probes(domain: str, stream_dir: str, n: int) -> list:
    from herllm.acquire.corpus import ProbeItem

    if n <= 0:
        return []
    if not stream_dir:
        from herllm.acquire.corpus import load_probes

        items = load_probes(domain)
    else:
        path = Path(stream_dir) / domain / "probes.jsonl"
        if not path.is_file():
            return []
        items = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
                items.append(ProbeItem(**{**row, "choices": tuple(row["choices"])}))
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise UserError(
                    f"{path}:{lineno}: not a probe item ({exc}); see the probe format in the README"
                ) from None
    items = sorted(items, key=lambda it: it.id)
    random.Random(0).shuffle(items)  # a fixed, representative subset of every kind
    return items[:n]


def cut_to_budget(docs: list[str], tokenizer, budget: int) -> tuple[list[str], int]:
    """Whole documents in order until `budget` tokens; the last one cut at a token boundary."""
    out, used = [], 0
    extra = int(tokenizer.bos_token_id is not None) + int(tokenizer.eos_token_id is not None)
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if used + len(ids) + extra <= budget:
            out.append(doc)
            used += len(ids) + extra
            continue
        keep = budget - used - extra
        if keep > 16:
            out.append(tokenizer.decode(ids[:keep]))
            used += len(tokenizer(out[-1], add_special_tokens=False)["input_ids"]) + extra
        break
    return out, used


def load_bench_data(bc, root: Path) -> BenchData:
    from herllm.acquire.corpus import DOMAINS
    from herllm.config import ModelConfig
    from herllm.models.load import load_base

    if bc.stream_dir and not Path(bc.stream_dir).is_dir():
        raise UserError(f"--stream-dir {bc.stream_dir} is not a directory")
    domains = list(bc.domains) or (
        sorted(p.name for p in Path(bc.stream_dir).iterdir() if (p / "train.txt").is_file())
        if bc.stream_dir else list(DOMAINS)
    )  # fmt: skip
    if not domains:
        raise UserError(f"no domains found in {bc.stream_dir}; expected DIR/<domain>/train.txt")
    model, tokenizer = load_base(ModelConfig(name_or_path=bc.model))
    root.mkdir(parents=True, exist_ok=True)
    train_files, tokens, batches, probes = {}, {}, {}, {}
    for d in domains:
        docs, used = cut_to_budget(
            _read_docs(d, "train", bc.stream_dir), tokenizer, bc.tokens_per_domain
        )
        path = root / f"{d}.train.txt"
        path.write_text("\n\x1e\n".join(docs), encoding="utf-8")
        train_files[d], tokens[path] = path, used
        batches[d] = pack_batches(
            _read_docs(d, "test", bc.stream_dir), tokenizer, bc.seq_len, bc.eval_windows
        )
        probes[d] = _read_probes(d, bc.stream_dir, bc.probe_items)
    general_dir = Path(bc.stream_dir) / "general" if bc.stream_dir else None
    general_docs = _read_docs(
        "general", "test", bc.stream_dir if general_dir and general_dir.is_dir() else ""
    )
    instruct = []
    if bc.instructions > 0:  # the base model's own answers: what it already knew how to do
        from herllm.evaluate.instruct import INSTRUCTIONS, base_answer_batches

        instruct = base_answer_batches(model, tokenizer, INSTRUCTIONS[: bc.instructions],
                                       new_tokens=bc.instruct_tokens)  # fmt: skip
    del model
    suite = EvalSuite(batches, pack_batches(general_docs, tokenizer, bc.seq_len, bc.eval_windows),
                      {d: p for d, p in probes.items() if p}, instruct)  # fmt: skip
    return BenchData(domains, train_files, tokens, suite, root)
