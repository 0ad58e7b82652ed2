"""The learner: acquire -> score -> select -> mix with replay -> update -> checkpoint -> evaluate.

`Learner.run` is the whole loop and reads top to bottom; each phase is a named helper below it.
Set-up (model, stream, buffer, resume) lives in `herllm.setup`, so this file is only the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from herllm.acquire.chunks import Experience, to_batch
from herllm.config import RunConfig
from herllm.memory.replay import BufferItem
from herllm.progress import LoopProgress
from herllm.refine.scoring import score_batch, token_stats
from herllm.setup import RunState, build_state, load_checkpoint, save_checkpoint


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops (the last checkpoint is intact)."""


@dataclass
class Summary:
    run_dir: str
    steps: int
    windows_read: int
    tokens_streamed: int
    tokens_scored: int
    tokens_trained: int
    selected: int
    skipped_by_selection: int
    replayed: int
    bad_inputs_skipped: int
    buffer_rows: int
    nonfinite_skipped: int
    wall_seconds: float
    train_tokens_per_s: float
    eval_first: dict[str, float] = field(default_factory=dict)
    eval_last: dict[str, float] = field(default_factory=dict)


class Learner:
    """Continual LoRA adaptation of a causal LM over a resumable stream (see module doc)."""

    def __init__(self, cfg: RunConfig, resume: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.s: RunState = build_state(cfg, resume=resume)
        if resume:
            load_checkpoint(self.s)
        self.show_progress = show_progress
        self.until_tokens: int | None = None

    def close(self) -> None:
        """Release the replay buffer (its last commit is the last checkpoint's)."""
        if self.s.buffer is not None:
            self.s.buffer.close()
            self.s.buffer = None

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, until_tokens: int | None = None) -> Summary:
        """Learn until the stream or the budget ends (or `until_tokens` streamed tokens, so a
        caller such as the benchmark can evaluate and call `run` again)."""
        s, cfg = self.s, self.cfg
        self.until_tokens = until_tokens
        if s.step == 0 and not s.evaluated_at_start:
            self.evaluate()
            s.evaluated_at_start = True
        with LoopProgress(cfg.train.max_steps or None, s.step, self.show_progress) as bar:
            while not self.budget_spent():
                new = self.acquire()  # acquire + score + select (+ record in the buffer)
                if not new:
                    break  # the stream is exhausted
                replay = self.sample_replay()
                loss = self.update(new, replay)
                s.step += 1
                if s.step % cfg.checkpoint.every_steps == 0:
                    save_checkpoint(s)
                if s.step % cfg.eval.every_steps == 0:
                    self.evaluate()
                bar.update(s.step, s.counters, loss, len(s.buffer) if s.buffer else 0)
        save_checkpoint(s)
        if s.step % cfg.eval.every_steps != 0 and cfg.eval.files:
            self.evaluate()
        return self.summary()

    # -- phases -----------------------------------------------------------------------------
    def budget_spent(self) -> bool:
        t = self.cfg.train
        c = self.s.counters
        until = self.until_tokens
        return (
            (t.max_steps > 0 and self.s.step >= t.max_steps)
            or (t.max_tokens > 0 and c["tokens_streamed"] >= t.max_tokens)
            or (until is not None and c["tokens_streamed"] >= until)
        )

    def acquire(self) -> list[Experience]:
        """Read and score windows until a batch's worth of new experiences is selected."""
        s = self.s
        want = self.cfg.train.batch_size - self.cfg.replay_per_batch
        while len(s.pending) < want and not s.stream_done:
            windows = s.next_windows(self.cfg.select.score_batch_size)
            if not windows:
                s.stream_done = True
                break
            scores = score_batch(s.model, s.to_device(to_batch(windows)))
            chosen = s.selector.select(scores.nll.numpy())
            self.remember(windows, scores.nll.numpy(), step=s.step)
            s.pending.extend(w for w, keep in zip(windows, chosen, strict=True) if keep)
            c = s.counters
            c["windows_read"] += len(windows)
            c["tokens_streamed"] += sum(w.n_tokens for w in windows)
            c["tokens_scored"] += scores.tokens
            c["selected"] += int(chosen.sum())
            c["skipped_by_selection"] += int((~chosen).sum())
        batch, s.pending = s.pending[:want], s.pending[want:]
        return batch

    def remember(self, windows: list[Experience], nll: np.ndarray, step: int) -> None:
        """Offer every read window (selected or not) to the replay buffer."""
        if self.s.buffer is None:
            return
        items = [
            BufferItem(w.doc_id, w.offset, w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens])
            for w in windows
        ]
        self.s.buffer.add(items, nll.tolist(), step=step)

    def sample_replay(self) -> list:
        k = self.cfg.replay_per_batch
        if k == 0 or self.s.buffer is None or len(self.s.buffer) == 0:
            return []
        return self.s.buffer.sample(k)

    def update(self, new: list[Experience], replay: list) -> float:
        """One optimizer step on new + replay experiences; non-finite losses are skipped."""
        s = self.s
        rows = [s.row_to_experience(r) for r in replay]
        batch = s.to_device(to_batch(new + rows))
        s.model.train()
        out = s.model(**batch)
        loss = out.loss
        if not torch.isfinite(loss):
            return self.skip_nonfinite(float(loss.detach()))
        s.accelerator.backward(loss)
        if self.cfg.train.grad_clip > 0:
            norm = s.accelerator.clip_grad_norm_(s.trainable, self.cfg.train.grad_clip)
            if not torch.isfinite(torch.as_tensor(norm)):
                s.optimizer.zero_grad(set_to_none=True)
                return self.skip_nonfinite(float(norm))
        s.snapshot_good_weights()  # these weights gave a finite loss: the state to fall back to
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.nonfinite_streak = 0
        if replay and self.cfg.replay.policy == "priority" and self.cfg.replay.refresh_scores:
            nll, _, _ = token_stats(out.logits.detach()[len(new) :], batch["labels"][len(new) :])
            s.buffer.update_scores([r.row_id for r in replay], nll.cpu().tolist())
        c = s.counters
        c["tokens_trained"] += int(batch["attention_mask"].sum())
        c["replayed"] += len(replay)
        return float(loss.detach())

    def skip_nonfinite(self, value: float) -> float:
        """Skip this step, restore the last good adapter weights, stop if it keeps happening."""
        s = self.s
        s.nonfinite_streak += 1
        s.counters["nonfinite_skipped"] += 1
        s.restore_good_weights()
        s.log_event({"event": "nonfinite_loss", "step": s.step, "value": value})
        if s.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"{s.nonfinite_streak} consecutive non-finite losses at step {s.step}; lower "
                "train.lr or check the data; the last checkpoint is intact (--resume)"
            )
        return math.nan

    def evaluate(self) -> dict[str, float]:
        """Mean held-out NLL per eval file, appended to metrics.jsonl."""
        s = self.s
        results = s.evaluate_heldout()
        record = {
            "step": s.step,
            "time": time.time(),
            "eval_nll": results,
            **{k: s.counters[k] for k in ("tokens_streamed", "tokens_trained", "selected")},
        }
        s.log_metrics(record)
        if s.eval_first is None:
            s.eval_first = results
        s.eval_last = results
        return results

    def summary(self) -> Summary:
        s = self.s
        c = s.counters
        wall = c["train_seconds"] + (time.perf_counter() - s.started)
        return Summary(
            run_dir=str(s.run_dir),
            steps=s.step,
            windows_read=c["windows_read"],
            tokens_streamed=c["tokens_streamed"],
            tokens_scored=c["tokens_scored"],
            tokens_trained=c["tokens_trained"],
            selected=c["selected"],
            skipped_by_selection=c["skipped_by_selection"],
            replayed=c["replayed"],
            bad_inputs_skipped=s.source_stats.skipped_count,
            buffer_rows=len(s.buffer) if s.buffer else 0,
            nonfinite_skipped=c["nonfinite_skipped"],
            wall_seconds=wall,
            train_tokens_per_s=c["tokens_trained"] / wall if wall > 0 else 0.0,
            eval_first=s.eval_first or {},
            eval_last=s.eval_last or {},
        )
