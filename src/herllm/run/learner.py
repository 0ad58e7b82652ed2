"""The learner: acquire -> score -> detect shift -> select -> mix with replay -> update ->
checkpoint -> evaluate.

`Learner.run` is the whole loop and reads top to bottom; each phase is a named helper below it.
Set-up lives in `run.build`, checkpoints in `run.checkpoint`, knowledge-unit bookkeeping in
`run.units`, and everything that differs between one process, DDP, FSDP and DeepSpeed behind
`parallel.engine`, so this file is only the loop.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from herllm.acquire.chunks import Experience, to_batch
from herllm.config import RunConfig
from herllm.memory.rehearsal import KEY as REHEARSAL_KEY
from herllm.memory.replay import BufferItem
from herllm.refine.scoring import Scores, sample_nll, score_batch, step_scores
from herllm.run.build import build_state
from herllm.run.checkpoint import load_checkpoint, save_checkpoint
from herllm.run.lock import LEARNER_FIX, RunLock, is_main_rank
from herllm.run.progress import LoopProgress
from herllm.run.state import RunState
from herllm.run.summary import Summary, summarize
from herllm.run.units import close_unit, earlier_units_loss, open_first_unit
from herllm.update.adapters import orthogonality


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stops (the last checkpoint is intact)."""


class Learner:
    """Continual LoRA adaptation of a causal LM over a resumable stream (see module doc)."""

    def __init__(self, cfg: RunConfig, resume: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.lock = RunLock(cfg.run_dir, LEARNER_FIX).acquire() if is_main_rank() else None
        try:
            self.s: RunState = build_state(cfg, resume=resume)
            if resume:
                load_checkpoint(self.s)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        self.show_progress = show_progress and self.s.ranks.main
        self.until_tokens: int | None = None
        self.trained_scores: Scores | None = None
        """`select.scores=step`: the scores of the last step's new rows, from its forward."""
        self.stopping = False
        """Set by `stop` (a signal under --follow): the loop ends after the current step."""

    def close(self) -> None:
        """Release the replay buffer (its last commit is the last checkpoint's) and the store."""
        if self.s.buffer is not None:
            self.s.buffer.close()
            self.s.buffer = None
        if self.s.ingest is not None:
            self.s.ingest.close()
            self.s.ingest = None
        self.s.ranks.close(self.s.engine)
        if self.lock is not None:
            self.lock.release()

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
        self.start()  # first call only: baseline evaluation, first knowledge unit
        with LoopProgress(cfg.train.max_steps or None, s.step, self.show_progress) as bar:
            while not self.budget_spent() and not self.stopping:
                new = self.acquire()  # read -> score -> detect shift -> select -> remember
                if new is None:
                    if s.waiting:  # a followed stream has nothing new yet
                        self.idle()
                        continue
                    break  # the stream is exhausted (on N processes: every rank's shard)
                self.wait_while_busy()  # a served log: train between requests only
                replay = self.sample_replay()  # past experience from the buffer
                general = self.sample_general()  # general text that protects general ability
                trained = new
                if cfg.replay.mode == "replace":  # replayed rows take new windows' places
                    trained = self.make_room(new, len(replay) + len(general))
                loss = self.update(trained, replay, general)  # LM loss + protection, one step
                if cfg.select.scores == "step":  # detect, remember: from the step's scores
                    self.digest_trained(new, len(trained))
                s.step += 1
                self.stabilize()  # periodic consolidation and strength adaptation
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
    def start(self) -> None:
        s = self.s
        if s.step == 0 and not s.evaluated_at_start:
            self.evaluate()
            s.evaluated_at_start = True
        if s.ledger.current is None:
            open_first_unit(s)
        s.protection.start(s.model)

    def idle(self) -> None:
        """A followed stream has nothing new: checkpoint once (a kill loses nothing learned),
        then wait for more."""
        save_checkpoint(self.s)  # a no-op when the last step is already checkpointed
        deadline = time.monotonic() + self.cfg.stream.follow_poll
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, self.cfg.stream.follow_poll))

    def wait_while_busy(self) -> None:
        """Hold the next step while a followed source's owner is busy (the server has requests
        in flight); the seconds held are counted in `s.held_s`."""
        follower = self.s.follower
        if follower is None:
            return
        start = time.monotonic()
        while not self.stopping and follower.busy():
            time.sleep(0.01)
        self.s.held_s += time.monotonic() - start

    def stop(self, *_signal) -> None:
        """Stop after the current step, with a checkpoint (SIGTERM / Ctrl-C under --follow)."""
        self.stopping = True

    def budget_spent(self) -> bool:
        t, c, until = self.cfg.train, self.s.counters, self.until_tokens
        return (
            (t.max_steps > 0 and self.s.step >= t.max_steps)
            or (t.max_tokens > 0 and c["tokens_streamed"] >= t.max_tokens)
            or (until is not None and c["tokens_streamed"] >= until)
        )

    def acquire(self) -> list[Experience] | None:
        """Read and score windows until a batch's worth of new experiences is selected; None
        when the stream is exhausted.

        On N processes each rank reads its own shard and the scored windows of all ranks are
        gathered: detection, selection, the ledger and the counters see the whole stream on every
        rank (so every rank decides the same), and each rank keeps its own selected windows. The
        run goes on until every rank's shard is learned: a rank whose shard has ended gets an
        empty batch (see `update`) while the others still have windows.
        """
        s = self.s
        want = self.cfg.train.batch_size
        if self.cfg.replay.mode == "add":
            want -= self.cfg.replay_rows(s.step) + self.cfg.general_rows(s.step)
            if s.rehearsal is not None:
                want -= self.cfg.rehearsal_rows(s.step)
        s.waiting = False
        while s.ranks.any_true(len(s.pending) < want and not s.stream_done and not s.waiting):
            if self.cfg.select.scores == "step":  # scored by the step that trains them
                s.pending.extend(self.read(want - len(s.pending)))
                continue
            windows, scores, mine = self.read_and_score(want)
            if not windows:
                continue  # every rank that still needed windows has reached its shard's end
            chosen = self.digest(windows, scores)
            s.pending.extend(
                w for w, k, own in zip(windows, chosen, mine, strict=True) if k and own
            )
        if not s.ranks.set_active(bool(s.pending)):  # which ranks train on new windows
            return None  # the stream (on N processes: every rank's shard) has ended, or waits
        # a followed stream that waits: what was read is learned now, in a smaller batch
        batch, s.pending = s.pending[:want], s.pending[want:]
        return batch

    def digest(self, windows: list[Experience], scores: Scores) -> np.ndarray:
        """What every rank does with the scored windows of all ranks (in stream order): shift
        detection (and the unit close it calls for), selection, the ledger, the replay buffer
        and the counters. Returns which windows are selected for training."""
        s = self.s
        if s.detector is not None:
            event = s.detector.update(
                torch.stack([scores.nll, scores.entropy], 1), scores.reps, s.step
            )
            # taken on rank 0 and broadcast, so every rank applies the same decision even
            # if their devices rounded the scores differently
            event = s.ranks.broadcast(event)
            if event is not None:  # close, consolidate, pick the adapter, open next
                close_unit(s, event, windows, scores.reps if scores.base else None)
        chosen = s.selector.select(scores.nll.numpy())
        self.record(windows, chosen, scores.nll.numpy(), scores)
        return chosen

    def record(self, windows: list[Experience], chosen, nll, scores: Scores | None) -> None:
        """The ledger, the replay buffer (at `nll`) and the counters for windows of every rank
        read; `scores` None: unscored windows, which the detector did not see."""
        s, c = self.s, self.s.counters
        reps = scores.reps if scores is not None else None
        s.ledger.observe([(w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens]) for w in windows],
                         chosen, reps, base=scores is not None and scores.base,
                         detected=scores is not None)  # fmt: skip
        self.remember(windows, nll, step=s.step)
        c["windows_read"] += len(windows)
        c["tokens_streamed"] += sum(w.n_tokens for w in windows)
        c["tokens_scored"] += scores.tokens if scores is not None else 0
        c["selected"] += int(chosen.sum())
        c["skipped_by_selection"] += int((~chosen).sum())

    def digest_trained(self, new: list[Experience], n_trained: int) -> None:
        """`select.scores=step`: every rank's new windows, after the step that trained the first
        `n_trained` (with its scores). Those `replay.mode=replace` left out are scored by a pass
        while the detector confirms a candidate (it then sees every window), else go unscored."""
        s = self.s
        step = self.trained_scores
        fresh = step is not None and len(step) == n_trained  # not after a skipped step
        again = self.score([] if fresh else new[:n_trained])  # every rank calls `score` alike
        windows, scores, _ = s.ranks.gather_scored(new[:n_trained], step if fresh else again)
        if windows:
            self.digest(windows, scores)
        left = new[n_trained:]
        if not s.ranks.any_true(bool(left)):
            return
        if s.ranks.broadcast(s.detector is not None and s.detector.watching):
            windows, scores, _ = s.ranks.gather_scored(left, self.score(left))
            if windows:
                self.digest(windows, scores)
            return
        none = torch.full((len(left),), float("nan"))
        left, _, _ = s.ranks.gather_scored(left, Scores(none, none, None, 0))
        nll = scores.nll[torch.isfinite(scores.nll)] if windows else torch.zeros(0)
        estimate = float(nll.mean()) if len(nll) else float("nan")  # of those trained beside them
        self.record(left, np.ones(len(left), bool), np.full(len(left), estimate), None)

    def make_room(self, new: list[Experience], n_replayed: int) -> list[Experience]:
        """`replay.mode=replace`: keep as many new windows as leave room for `n_replayed` rows
        in the batch (at least one); the others are offered to the buffer (when read; with
        `select.scores=step` after the step) and counted, so the run trains as many tokens per
        step as without replay."""
        keep = max(1, self.cfg.train.batch_size - n_replayed) if new else 0
        (left_out,) = self.s.ranks.sum(max(0, len(new) - keep))  # on N processes: every rank's
        self.s.counters["replaced_by_replay"] += int(left_out)
        return new[:keep]

    def read(self, n: int) -> list[Experience]:
        """Up to `n` of this rank's next windows (none when its shard has ended)."""
        s = self.s
        if n <= 0 or s.stream_done:
            return []
        windows, s.waiting = s.next_windows(n)
        s.stream_done = not windows and not s.waiting
        return windows

    def read_and_score(self, want: int) -> tuple[list[Experience], Scores, list[bool]]:
        """Score this rank's next windows (none when it has enough, or its shard has ended),
        then gather every rank's in stream order; `mine` marks this rank's own."""
        s = self.s
        windows = self.read(self.cfg.select.score_batch_size) if len(s.pending) < want else []
        return s.ranks.gather_scored(windows, self.score(windows))

    def score(self, windows: list[Experience]) -> Scores:
        """No-grad scores of new windows, when something uses them (selection, shift detection,
        priority replay, knowledge units); plain fine-tuning and uniform replay skip the pass."""
        s, cfg = self.s, self.cfg
        reps = cfg.shift.reps if s.detector is not None else "model"
        base = reps == "base"
        if self.scores_needed() and s.ranks.forward_together(bool(windows)):
            # with an FSDP-sharded base a rank without windows runs a placeholder pass; the
            # entropy is a detector channel, and nothing else reads it
            rows = windows or [s.placeholder_window()]
            scores = score_batch(s.model, s.to_device(to_batch(rows)), reps=reps,
                                 entropy=s.detector is not None)  # fmt: skip
            if windows:
                return scores
        nan = torch.full((len(windows),), float("nan"))
        return Scores(nll=nan, entropy=nan, reps=None, tokens=0, base=base)

    def scores_needed(self) -> bool:
        """Whether anything reads the scores of new windows."""
        s, cfg = self.s, self.cfg
        return bool(cfg.select.policy != "all" or s.detector is not None or s.protection.regs
                    or (cfg.replay.capacity > 0 and cfg.replay.policy == "priority"))  # fmt: skip

    def remember(self, windows: list[Experience], nll: np.ndarray, step: int) -> None:
        """Offer every read window (selected or not) to the replay buffer."""
        if self.s.buffer is None:
            return
        items = [
            BufferItem(w.doc_id, w.offset, w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens])
            for w in windows
        ]
        # Unscored windows (uniform replay needs no score) are stored with score 0.
        self.s.buffer.add(items, np.nan_to_num(nll, nan=0.0).tolist(), step=step)

    def sample_replay(self) -> list:
        return self.s.ranks.sample_replay(self.s.buffer, self.cfg.replay_rows(self.s.step))

    def sample_general(self) -> list[Experience]:
        """General-text windows, then the base model's own answers (rehearsal) when it runs."""
        s = self.s
        text = s.ranks.sample_general(s.general, self.cfg.general_rows(s.step))
        if s.rehearsal is None:
            return text
        return text + s.ranks.sample_general(s.rehearsal, self.cfg.rehearsal_rows(s.step))

    def update(self, new: list[Experience], replay: list, general: list[Experience]) -> float:
        """One optimizer step on new + replay + general experiences; non-finite losses are skipped.

        On N processes a rank whose shard has ended (no new windows; it gets no replay either)
        still runs the step, which DDP and FSDP need from every rank, on a placeholder window
        whose loss counts zero; the active ranks' losses are scaled by N / active, so the
        averaged gradient is the mean over the active ranks."""
        s = self.s
        exps = new + [s.row_to_experience(r) for r in replay] + general
        real = bool(exps)
        batch = s.to_device(to_batch(exps or [s.placeholder_window()]))
        s.engine.train_model.train()
        score = self.cfg.select.scores == "step" and self.scores_needed()
        reps = self.cfg.shift.reps if s.detector is not None else "model"
        base = reps == "base"
        # DDP-wrapped on N processes: gradients are averaged
        out = s.engine.train_model(**batch, output_hidden_states=score and not base)
        loss = self.objective(out.loss, batch) * s.ranks.loss_scale()
        skipped = s.engine.step(loss, after_backward=lambda: s.protection.after_backward(s.model),
                                after_step=self.after_step)  # fmt: skip
        self.trained_scores = None
        if skipped is not None:
            return self.skip_nonfinite(skipped)
        s.nonfinite_streak = 0
        # with an FSDP-sharded base a rank without new rows runs the base pass on its
        # placeholder row too (every rank takes part in a forward) and drops the result
        if score and (s.ranks.forward_together(bool(new)) if base else new):
            scores = step_scores(s.model, out, batch, max(len(new), 1), reps=reps,
                                 entropy=s.detector is not None)  # fmt: skip
            self.trained_scores = scores if new else None
        known = self.trained_scores.nll if self.trained_scores is not None else None
        self.track_losses(out.logits.detach(), batch["labels"], len(new), replay, known)
        own = sum(e.key.startswith(REHEARSAL_KEY) for e in general)
        tokens, n_replay, n_general, n_own = s.ranks.sum(
            int(batch["attention_mask"].sum()) if real else 0, len(replay), len(general), own
        )
        c = s.counters
        c["tokens_trained"] += int(tokens)
        c["replayed"] += int(n_replay)
        c["general_replayed"] += int(n_general)
        c["rehearsed"] += int(n_own)
        return float(out.loss.detach())

    def objective(self, lm_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """LM loss + protection penalties (+ orthogonality to the frozen adapters, O-LoRA)."""
        s = self.s
        loss = (
            lm_loss + s.protection.penalty(s.model, batch, lm_loss)
            if s.protection.active
            else lm_loss
        )
        if s.orth is not None and s.bank.frozen():  # O-LoRA: keep the new subspace orthogonal
            overlap = orthogonality(s.model, s.bank.current, s.bank.frozen())
            loss = loss + s.orth.weight("orth", overlap, lm_loss) * overlap
        return loss

    def after_step(self) -> None:
        """Regularizer bookkeeping after the optimizer step, and Reptile when it is due."""
        s = self.s
        if s.protection.after_step(s.model, s.engine.optimizer):  # Reptile moved the weights
            s.counters["reptile_steps"] += 1
            s.engine.weights_written()

    def track_losses(self, logits, labels, n_new: int, replay: list, known=None) -> None:
        """Per-sample losses feed priority refresh and the stability signals (EMAs). `known`:
        the new rows' losses where the step's scores already hold them (not computed again)."""
        s = self.s
        refresh = (
            self.cfg.replay.policy == "priority"
            and self.cfg.replay.refresh_scores
            and s.ranks.any_true(bool(replay))
        )
        if not (refresh or (s.protection.regs and self.cfg.protect.dynamic)):
            return  # nobody needs them: keep the step as cheap as a bare training step
        n = n_new + len(replay)
        if known is not None and len(known) == n_new:
            nll = torch.cat([known.to(logits.device), sample_nll(logits[n_new:n], labels[n_new:n])])
        else:
            nll = sample_nll(logits[:n], labels[:n])  # (n,)
        s.stability.update(*s.ranks.new_and_replay_loss(nll, n_new))  # over the global batch
        if refresh:  # rank 0 writes the scores of every rank's replayed rows
            s.ranks.update_scores(s.buffer, [r.row_id for r in replay], nll[n_new:].cpu().tolist())

    def stabilize(self) -> None:
        """Periodic consolidation (if asked) and adaptation of the penalty strength."""
        s, p = self.s, self.cfg.protect
        if p.consolidate_every and s.step % p.consolidate_every == 0 and s.protection.regs:
            s.protection.consolidate(s.model, s.unit_batches())
            s.counters["consolidations"] += 1
        if s.protection.regs and p.dynamic and s.step % p.observe_every == 0:
            s.protection.observe(*s.stability.signals(units_loss=earlier_units_loss(s)))

    def skip_nonfinite(self, value: float) -> float:
        """Count and log a step the engine skipped (it restored the last good adapter weights);
        stop if it keeps happening."""
        s = self.s
        s.nonfinite_streak += 1
        s.counters["nonfinite_skipped"] += 1
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
        counts = {
            k: s.counters[k] for k in ("tokens_streamed", "tokens_trained", "selected", "shifts")
        }
        s.log_metrics({"step": s.step, "time": time.time(), "eval_nll": results, **counts})
        if s.eval_first is None:
            s.eval_first = results
        s.eval_last = results
        return results

    def summary(self) -> Summary:
        return summarize(self.s)
