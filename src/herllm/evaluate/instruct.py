"""General ability as what the base model already did: its own answers to fixed instructions.

A held-out general-text NLL says whether the model still predicts ordinary prose; it says
nothing about whether an instruction-tuned model still answers as it did. Here the base model
answers a fixed set of instructions once (greedy, through its chat template when it has one);
afterwards an adapted model is scored by the mean per-token NLL of those answers (teacher
forced, loss on the answer tokens only). The answers are the base model's most likely
continuations, so the base scores low on them and any drift away from its behaviour raises the
figure: `instruct_delta` = adapted - base is the general-ability loss on instructions. No
reference answers or labels are needed, so it works for any causal LM.
"""

from __future__ import annotations

import torch

from herllm.evaluate.intrinsic import samples_to_batches
from herllm.models.chat import encode_chat, has_chat_template

INSTRUCTIONS = (
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a Python function that returns the largest number in a list.",
    "What is the capital of France, and what river runs through it?",
    "Give three tips for staying focused while studying.",
    "Summarise the plot of a heist story in one short paragraph.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn leaves.",
    "How many minutes are there in three and a half hours? Show the steps.",
    "Name four planets of the solar system and one fact about each.",
    "Write a polite email declining a meeting invitation.",
    "What does a thermometer measure, and in which units?",
    "Explain what a recipe's 'preheat the oven' step is for.",
    "List the primary colours of light.",
    "Describe how to make a cup of tea, step by step.",
    "Why do people use umbrellas? Answer in one sentence.",
    "Write a short story opening that begins on a train at night.",
    "What is photosynthesis? Explain it to a ten-year-old.",
    "Give an example of a simile and explain what it means.",
    "What are the first five prime numbers?",
    "Suggest a name for a small bakery and say why it fits.",
    "Explain what an HTTP 404 error means.",
    "Write a SQL query that counts the rows of a table named orders.",
    "What should someone pack for a one-day hike?",
    "Rewrite this sentence in the past tense: 'She walks to school.'",
    "What is the boiling point of water at sea level in Celsius?",
    "Explain the rule of a game of tic-tac-toe.",
    "Give two reasons why sleep matters for health.",
    "What is a noun? Give three examples.",
    "Write a limerick about a cat who loves to cook.",
    "How do you convert kilometres to miles?",
    "Describe the colour green to someone who cannot see.",
)


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """The instruction as the model is asked it: through its chat template, or as plain text."""
    if has_chat_template(tokenizer):
        return encode_chat(tokenizer, [{"role": "user", "content": instruction}])
    ids = tokenizer(f"Question: {instruction}\nAnswer:", add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def greedy_answers(
    model, tokenizer, instructions, new_tokens: int = 48, batch_size: int = 1
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of the model's greedy answers to `instructions`, with its
    adapters disabled when it has any (a PEFT model), so this is the base model's behaviour.
    An answer keeps its end-of-answer token and drops what follows; empty answers are left out.
    `batch_size` 1 answers one at a time (no padding: exact); more pads prompts on the left,
    which is several times faster and may round differently (fine for rehearsal data)."""
    import contextlib

    was_training = model.training
    model.eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, i) for i in instructions]
    rows = []
    with off:
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo : lo + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attn = (ids != -1).long()  # (B, width): ones, then the left padding zeroed
            for i, p in enumerate(chunk):
                attn[i, : width - len(p)] = 0
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad)  # fmt: skip
            for prompt, row in zip(chunk, out[:, width:].tolist(), strict=True):
                eos = tokenizer.eos_token_id
                answer = row[: row.index(eos) + 1] if eos in row else row
                if answer:
                    rows.append((prompt, answer))
    if was_training:
        model.train()
    return rows


def base_answer_batches(
    model, tokenizer, instructions=INSTRUCTIONS, new_tokens: int = 48, batch_size: int = 8
) -> list[dict]:
    """The base model's greedy answers to `instructions`, as batches for `mean_nll`: prompt and
    answer tokens, labels on the answer only. Answered one at a time, so answers are exact."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = greedy_answers(model, tokenizer, instructions, new_tokens)
    return samples_to_batches([p + a for p, a in rows], batch_size, pad, [len(p) for p, _ in rows])
