"""What the replay buffer stores and returns: one experience, and one stored row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class BufferItem:
    """One experience offered to the buffer.

    Attributes:
        doc_id: Stable id of the source document.
        offset: Token offset of this chunk inside the document.
        input_ids: Token ids, 1-D, stored as int32.
        loss_mask: Bool mask of the same length (True = token counts); None = all count.
    """

    doc_id: str
    offset: int
    input_ids: np.ndarray
    loss_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.input_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"BufferItem({self.doc_id!r}, {self.offset}): input_ids must be a non-empty "
                f"1-D integer array, got shape {ids.shape} dtype {ids.dtype}"
            )
        object.__setattr__(self, "input_ids", ids.astype(np.int32, copy=False))
        if self.loss_mask is not None:
            mask = np.asarray(self.loss_mask, dtype=bool)
            if mask.shape != ids.shape:
                raise ValueError(
                    f"BufferItem({self.doc_id!r}, {self.offset}): loss_mask shape {mask.shape} "
                    f"must equal input_ids shape {ids.shape}"
                )
            object.__setattr__(self, "loss_mask", mask)


@dataclass(frozen=True, eq=False, kw_only=True)
class BufferRow(BufferItem):
    """A stored experience as returned by :meth:`ReplayBuffer.sample`.

    Attributes:
        row_id: Unique, never reused id (pass it back to ``update_scores``).
        step_first_seen: Trainer step at which the row was added.
        last_score: Latest score (loss) given by ``add`` or ``update_scores``.
        times_replayed: Times sampled by a writer, this sample included.
    """

    row_id: int
    step_first_seen: int
    last_score: float
    times_replayed: int
