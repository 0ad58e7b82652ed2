"""Experience acquisition, part 2: Documents -> fixed-length token windows ("experiences").

Documents are tokenized one at a time and packed back to back (separated by EOS) into windows of
`seq_len` tokens, so short records (a dictionary entry, a verse) waste no compute on padding.
Each window remembers where it starts: the document id, the document's index in the stream and
the token offset inside it. That start position is all the durable cursor needs to resume.
Only the very last window of a finite stream is padded (attention and loss masked).

Chat records (`{"messages": [...]}`, and prompt/response records when the model has a chat
template, see `stream.chat_template`) are rendered through the tokenizer's chat template and
only the assistant turns are trained (`herllm.models.chat.chat_training_example`); the
template writes its own special tokens, so no BOS/EOS is added around them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from herllm.acquire.sources import WAIT, Document
from herllm.errors import UserError
from herllm.models.chat import chat_training_example, has_chat_template

CHAT_TEMPLATE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Experience:
    key: str
    """`<doc_id>@<token offset>` of the window's first token: unique in a stream."""
    doc_id: str
    offset: int
    doc_index: int
    """Index of the window's first document in the stream (for the cursor)."""
    input_ids: np.ndarray
    """(T,) int32 token ids."""
    loss_mask: np.ndarray
    """(T,) bool: which tokens count in the loss (False for prompts and padding)."""
    attention_mask: np.ndarray
    """(T,) bool: False for padding."""

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class StreamPosition:
    """Where the next window starts: the durable cursor's content."""

    doc_index: int = 0
    token_offset: int = 0
    doc_id: str | None = None
    windows: int = 0
    tokens: int = 0


def tokenize_document(
    doc: Document, tokenizer, chat_template: str = "auto"
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of one document: [bos] text [eos], prompt(no loss) response, or
    a conversation through the chat template (the assistant turns trained, see module doc).

    `chat_template`: `auto` renders messages records always and prompt/response records when
    the tokenizer has a template; `always` renders both (one line without a template);
    `never` keeps prompt/response records plain and refuses messages records.
    """
    if uses_chat_template(doc, tokenizer, chat_template):
        ids, mask = chat_training_example(tokenizer, doc.conversation(), doc.doc_id)
        return list(ids), [bool(m) for m in mask]
    ids: list[int] = []
    mask: list[bool] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        mask.append(False)
    body = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    ids.extend(body)
    mask.extend([doc.response is None] * len(body))
    if doc.response is not None:
        resp = tokenizer(doc.response, add_special_tokens=False)["input_ids"]
        ids.extend(resp)
        mask.extend([True] * len(resp))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(True)
    return ids, mask


def uses_chat_template(doc: Document, tokenizer, mode: str) -> bool:
    """Whether `doc` is trained through the chat template (`tokenize_document`)."""
    if doc.messages is None and doc.response is None:
        return False  # a text document is never a conversation
    if mode not in CHAT_TEMPLATE_MODES:
        raise UserError(f"stream.chat_template={mode!r}: use one of auto, always, never")
    if doc.messages is not None and mode == "never":
        raise UserError(
            f"{doc.doc_id} is a chat 'messages' record, which trains only through a chat "
            "template, but stream.chat_template=never; set it to auto or drop the record"
        )
    if doc.messages is not None or mode == "always":
        if not has_chat_template(tokenizer):
            kind = "a chat 'messages' record" if doc.messages is not None else "a chat record"
            raise UserError(
                f"{doc.doc_id} is {kind}, but the model's tokenizer has no chat template; use "
                "--model smollm2-135m (or another model with a chat template), or "
                "stream.chat_template=never for prompt/response records"
            )
        return True
    return mode == "auto" and has_chat_template(tokenizer)


class Packer:
    """Pack a document stream into windows, starting at a given stream position."""

    def __init__(
        self,
        tokenizer,
        seq_len: int,
        start: StreamPosition | None = None,
        offsets: dict[int, tuple[int, str]] | None = None,
        chat_template: str = "auto",
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        """How chat records are tokenized (`tokenize_document`)."""
        self.seq_len = seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.position = StreamPosition(**vars(start)) if start else StreamPosition()
        self.offsets = dict(offsets or {})
        """Document index -> (token offset, document id) where an interrupted document resumes
        (a checkpoint of N processes re-dealt to M, see `herllm.acquire.cursor.Sharding`)."""

    def windows(self, docs: Iterator[Document]) -> Iterator[Experience]:
        """Yield windows; `self.position` is always the start of the next window. A followed
        source's `WAIT` (nothing new yet) flushes the part-filled window and is passed on."""
        start = self.position
        ids: list[int] = []
        mask: list[bool] = []
        # Where each buffered token came from: (doc_index, doc_id, offset of ids[0]) per doc piece.
        pieces: list[tuple[int, str, int, int]] = []  # (doc_index, doc_id, offset, buffer start)
        index = -1
        for doc in docs:
            if doc is WAIT:  # a followed source has nothing new now: what is buffered is learned
                if ids:
                    yield self._emit(ids, mask, pieces, len(ids))
                    ids, mask, pieces = [], [], []
                yield WAIT
                continue
            index += 1
            if index < start.doc_index:
                continue  # already consumed before the resume point: never tokenized again
            skip, expected = self.offsets.get(index, (0, None))
            if index == start.doc_index and start.token_offset >= skip:
                skip, expected = start.token_offset, start.doc_id
            if expected is not None and doc.doc_id != expected:
                raise UserError(
                    f"the stream changed since the checkpoint: document {index} is {doc.doc_id!r}, "
                    f"the checkpoint expected {expected!r}; resume with the same sources"
                )
            doc_ids, doc_mask = tokenize_document(doc, self.tokenizer, self.chat_template)
            pieces.append((index, doc.doc_id, skip, len(ids)))
            ids.extend(doc_ids[skip:])
            mask.extend(doc_mask[skip:])
            while len(ids) >= self.seq_len:
                yield self._emit(ids, mask, pieces, self.seq_len)
                pieces = _advance(pieces, self.seq_len, len(ids))
                ids, mask = ids[self.seq_len :], mask[self.seq_len :]
        if ids:
            yield self._emit(ids, mask, pieces, len(ids))
            self.position = StreamPosition(
                doc_index=pieces[-1][0] + 1,
                windows=self.position.windows,
                tokens=self.position.tokens,
            )

    def _emit(self, ids, mask, pieces, n: int) -> Experience:
        first_doc_index, first_doc_id, first_offset, _ = pieces[0]
        exp = padded_experience(
            f"{first_doc_id}@{first_offset}",
            first_doc_index,
            ids[:n],
            mask[:n],
            self.seq_len,
            self.pad_id,
        )
        nxt = _advance(pieces, n, len(ids))
        pos = self.position
        if nxt:
            self.position = StreamPosition(
                nxt[0][0], nxt[0][2], nxt[0][1], pos.windows + 1, pos.tokens + n
            )
        else:  # the window ended exactly at a document end: next window starts at the next doc
            self.position = StreamPosition(
                pieces[-1][0] + 1, 0, None, pos.windows + 1, pos.tokens + n
            )
        return exp


def padded_experience(key: str, doc_index: int, ids, mask, seq_len: int, pad_id: int) -> Experience:
    """A window of len(ids) <= seq_len real tokens, right-padded (attention and loss masked).

    `key` is `<doc_id>@<offset>`; mask None means every real token counts in the loss.
    """
    n = len(ids)
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    input_ids[:n] = ids
    loss_mask = np.zeros(seq_len, dtype=bool)
    loss_mask[:n] = True if mask is None else mask
    attention = np.zeros(seq_len, dtype=bool)
    attention[:n] = True
    doc_id, _, offset = key.rpartition("@")
    return Experience(key, doc_id, int(offset or 0), doc_index, input_ids, loss_mask, attention)


def _advance(
    pieces: list[tuple[int, str, int, int]], n: int, total: int
) -> list[tuple[int, str, int, int]]:
    """Drop the first n of `total` buffered tokens from the piece list, shifting offsets."""
    out = []
    for i, (doc_index, doc_id, offset, begin) in enumerate(pieces):
        end = pieces[i + 1][3] if i + 1 < len(pieces) else total
        if end <= n:
            continue  # this piece lies wholly inside the emitted window
        if begin >= n:
            out.append((doc_index, doc_id, offset, begin - n))
        else:
            out.append((doc_index, doc_id, offset + (n - begin), 0))
    return out


def window_batches(windows, seq_len: int, pad_id: int, device, batch_size: int = 8) -> list[dict]:
    """Unpadded windows `(token ids, loss mask)` as padded model batches on `device`."""
    exps = [padded_experience("", -1, ids, mask, seq_len, pad_id) for ids, mask in windows]
    return [
        {k: v.to(device) for k, v in to_batch(exps[i : i + batch_size]).items()}
        for i in range(0, len(exps), batch_size)
    ]


def to_batch(experiences: list[Experience]) -> dict:
    """Stack experiences into a model batch (torch tensors); labels are -100 where no loss."""
    import torch

    ids = torch.from_numpy(np.stack([e.input_ids for e in experiences]).astype(np.int64))  # (B, T)
    attn = torch.from_numpy(np.stack([e.attention_mask for e in experiences]))  # (B, T)
    loss_mask = torch.from_numpy(np.stack([e.loss_mask for e in experiences]))  # (B, T)
    labels = ids.masked_fill(~loss_mask, -100)
    return {"input_ids": ids, "attention_mask": attn.long(), "labels": labels}
