"""Self-rehearsal: the base model's own answers to general instructions, replayed with the stream.

General-text replay keeps an instruction-tuned model predicting prose, but not answering as it
did: on SmolLM2-135M-Instruct `her` with general text replay drifted on instruction answers as
much as plain fine-tuning (docs/benchmarks.md). Here the base model answers a set of general
instructions once, greedily, through its chat template (its own behaviour, so no labels and no
other model are needed; the idea of Self-Synthesized Rehearsal, Huang et al. 2024, ACL); the
prompt + answer pairs are replayed as their own share of each batch (`replay.rehearsal_ratio`),
with the loss on the answer tokens only.

The answers are written to `rehearsal.json` in the run directory at the first start and read
back on resume, so a resumed run replays exactly what the first start generated (the adapter has
moved by then, and the base is what is rehearsed). The bundled instructions
(`assets/rehearsal/instructions.txt`) are disjoint from the instruction set the benchmark scores
(`evaluate/instruct.py`).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from herllm.acquire.chunks import Experience, padded_experience
from herllm.errors import UserError
from herllm.memory.general import WindowPool

FILE = "rehearsal.json"
KEY = "rehearsal#"
"""How a rehearsal window's key starts (`rehearsal#<i>@0`)."""


def read_instructions(path: str = "") -> list[str]:
    """Instructions, one per line (`#` starts a comment): `path`, or the bundled set."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                f"replay.rehearsal_prompts={path!r} is not a file; give a text file with one "
                "instruction per line, or leave it empty for the bundled set"
            )
        text = p.read_text(encoding="utf-8")
    else:
        text = (resources.files("herllm.assets") / "rehearsal" / "instructions.txt").read_text(
            encoding="utf-8"
        )
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise UserError(f"replay.rehearsal_prompts={path!r} holds no instruction (one per line)")
    return out


def active(mode: str, tokenizer) -> bool:
    """Whether rehearsal runs: `always`, or `chat` with a model that has a chat template."""
    from herllm.models.chat import has_chat_template

    return mode == "always" or (mode == "chat" and has_chat_template(tokenizer))


def rehearsal_pairs(run_dir: Path, model, tokenizer, instructions: list[str], new_tokens: int,
                    seq_len: int | None = None, write: bool = True) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(prompt ids, answer ids) of the base model's answers: read from the run directory when
    they were made for the same instructions and length, else generated (and written there when
    `write`, atomically). `model` must be the base model (or adapters disabled). With `seq_len`
    no answer is generated longer than the shortest prompt leaves room for in a window."""
    from herllm.evaluate import instruct

    if seq_len is not None:
        shortest = min(len(instruct.prompt_ids(tokenizer, i)) for i in instructions)
        new_tokens = min(new_tokens, seq_len - shortest)
        if new_tokens < 1:
            return []
    path = Path(run_dir) / FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["instructions"] == instructions and saved["new_tokens"] == new_tokens:
            return [(list(p), list(a)) for p, a in saved["pairs"]]
    pairs = instruct.greedy_answers(model, tokenizer, instructions, new_tokens, batch_size=16)
    if write:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"instructions": instructions, "new_tokens": new_tokens,
                                   "pairs": pairs}))  # fmt: skip
        os.replace(tmp, path)
    return pairs


def rehearsal_windows(pairs, seq_len: int, pad_id: int) -> list[Experience]:
    """Each pair as one right-padded window, the loss on the answer only; an answer that does not
    fit is cut at `seq_len`, a prompt that leaves no room for an answer token is left out."""
    out = []
    for i, (prompt, answer) in enumerate(pairs):
        room = seq_len - len(prompt)
        if room < 1:
            continue
        ids = list(prompt) + list(answer[:room])
        mask = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
        out.append(padded_experience(f"{KEY}{i}@0", 0, ids, mask, seq_len, pad_id))
    return out


class RehearsalSampler(WindowPool):
    """Uniform draws from the rehearsal windows, by a generator of their own (checkpointed)."""

    def __init__(self, windows: list[Experience], seed: int):
        super().__init__(list(windows), seed + 7919)  # not the general sampler's draws
