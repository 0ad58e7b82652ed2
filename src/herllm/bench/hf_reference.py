"""`hf-peft`: the reference row users already run, a plain `transformers.Trainer` + PEFT script.

Same model, LoRA (r, alpha 2r, every linear layer), peak lr, batch and windows (herllm's Packer)
as the strategies, trained on the domains one segment at a time with the two fixes of Ibrahim
et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large Language Models",
arXiv:2403.08763):

- re-warming: one `Trainer.train()` per segment (a fresh AdamW), its lr rising linearly over the
  first 1% of the segment's steps (at least one) and decaying by a cosine to 10% of the peak at
  the segment's end;
- replay: 25% of the segment's windows, at random positions, are replaced by windows drawn
  uniformly from the earlier segments, so it trains on as many windows (and tokens) as `naive`.

The Trainer shuffles each segment's windows (its default sampler), as a user's script does.

The evaluator pauses the Trainer with a callback (`Pauses`): after the optimizer step where a
pause falls, the clock stops, the bench's EvalSuite runs, and the same `train()` continues, so a
segment's schedule is one warm-up and one cosine across its pauses. The record has the keys of
`Sequence.finish`, plus `lr_trace` (the lr of every optimizer step, in order).
"""

from __future__ import annotations

import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from herllm.acquire.chunks import Experience, Packer, to_batch
from herllm.acquire.sources import read_documents
from herllm.bench.suite import intrinsic_signals, run_metrics, switch_indices
from herllm.config import build_config
from herllm.evaluate.cost import Meter, peak_rss_mb, train_flops_per_token
from herllm.models.load import attach_lora, load_base

REPLAY_SHARE = 0.25
"""Share of each segment's windows replaced by windows of earlier segments."""
WARMUP_SHARE = 0.01
"""Linear warm-up as a share of a segment's optimizer steps (Trainer rounds it up)."""
MIN_LR_RATE = 0.1
"""The cosine ends each segment at this share of the peak lr."""


def segment_windows(path: Path, tokenizer, seq_len: int) -> list[Experience]:
    """One segment's windows: herllm's Packer over that training file alone."""
    return list(Packer(tokenizer, seq_len).windows(read_documents([str(path)])))


def with_replay(windows: list[Experience], past: list[Experience], rng: random.Random) -> list:
    """`windows` with REPLAY_SHARE of them, at random positions, replaced by windows drawn
    uniformly (with replacement) from `past`; unchanged when there is no past."""
    out = list(windows)
    if past:
        for i in rng.sample(range(len(out)), round(REPLAY_SHARE * len(out))):
            out[i] = past[rng.randrange(len(past))]
    return out


@contextmanager
def clock_stopped(meter: Meter):
    """Leave the meter's timed block for the duration (evaluation is not training time)."""
    meter.__exit__(None, None, None)
    try:
        yield
    finally:
        meter.__enter__()


class Pauses(TrainerCallback):
    """Calls `evaluate(state, at_end)` after each optimizer step where a pause falls (`due`:
    the global steps of the segment's pauses, the last at its end), and records every step's lr."""

    def __init__(self, due: list[int], evaluate):
        self.due, self.evaluate = due, evaluate
        self.lrs: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._fire(state)  # a pause that falls before the first step (a very short segment)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))  # the lr this step uses

    def on_step_end(self, args, state, control, **kwargs):
        self._fire(state)

    def _fire(self, state) -> None:
        for j, step in enumerate(self.due):
            if step == state.global_step:
                self.evaluate(state, at_end=j == len(self.due) - 1)


def make_trainer(
    model, windows: list[Experience], cfg, seed: int, run_dir: Path, pauses
) -> Trainer:
    """The Trainer a user script builds for one segment: one epoch, cosine with warm-up."""
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=cfg.train.batch_size,
        num_train_epochs=1, learning_rate=cfg.train.lr, warmup_steps=WARMUP_SHARE,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE},
        optim="adamw_torch", weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.grad_clip,
        seed=seed, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=windows, data_collator=to_batch,
                      callbacks=[pauses])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics to stdout
    return trainer


def run_hf_reference(bc, data, order: list[str], k: int, peak: float) -> dict:
    """Train `hf-peft` over `order` (one Trainer per segment), evaluated as every bench row."""
    return HFReference(bc, data, order, k, peak).run()


class HFReference:
    """One Trainer + PEFT run over one domain order, paused by the evaluator inside every domain."""

    def __init__(self, bc, data, order: list[str], k: int, peak: float):
        self.bc, self.data, self.order, self.peak, self.seed = bc, data, order, peak, bc.seed + k
        self.run_dir = Path(bc.out) / "runs" / f"hf-peft-order{k}"
        # the learners' settings, so the bench's --overrides reach this row too
        self.cfg = build_config(None, [
            f"model.name_or_path={bc.model}", f"stream.seq_len={bc.seq_len}",
            f"train.batch_size={bc.batch_size}", f"train.lr={bc.lr}", f"lora.r={bc.lora_r}",
            f"lora.alpha={2 * bc.lora_r}", f"train.seed={self.seed}", *bc.overrides,
        ])  # fmt: skip
        self.meter = Meter()
        self.trace: list[dict] = []
        self.rows, self.general, self.probe_rows, self.lrs = [], [], [], []
        self.instruct: list = []
        self.done = (0, 0)  # (optimizer steps, tokens) of the segments already trained
        self.pool: list[Experience] = []  # the replay pool of the last segment

    def run(self) -> dict:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        set_seed(self.seed)
        base, self.tok = load_base(self.cfg.model)
        self.model = attach_lora(base, self.cfg.lora)
        self.meter.start()
        self.evaluate(0, 0, 0, at_end=True)
        past: list[Experience] = []
        rng = random.Random(self.seed)
        self.streamed = self.replaced = 0  # the stream's tokens; new windows replay took
        for i, domain in enumerate(self.order):
            with self.meter:  # packing is part of training, as in the learner
                windows = segment_windows(
                    self.data.train_files[domain], self.tok, self.cfg.stream.seq_len
                )
            self.pool = past
            self.streamed += sum(w.n_tokens for w in windows)
            self.replaced += round(REPLAY_SHARE * len(windows)) if past else 0
            self.train_segment(i, with_replay(windows, past, rng))
            past = past + windows
        return self.finish()

    def train_segment(self, i: int, windows: list[Experience]) -> None:
        """One `Trainer.train()` over a segment; its pauses evaluate with the clock stopped."""
        n_steps = -(-len(windows) // self.cfg.train.batch_size)

        def pause(state, at_end: bool) -> None:
            with clock_stopped(self.meter):
                self.evaluate(i, state.global_step, state.num_input_tokens_seen, at_end)

        e = self.bc.evals_per_domain
        pauses = Pauses([round(n_steps * j / e) for j in range(1, e + 1)], pause)
        trainer = make_trainer(self.model, windows, self.cfg, self.seed, self.run_dir, pauses)
        with self.meter:
            trainer.train()
        self.done = (self.done[0] + trainer.state.global_step,
                     self.done[1] + trainer.state.num_input_tokens_seen)  # fmt: skip
        self.lrs += pauses.lrs

    def evaluate(self, segment: int, steps: int, tokens: int, at_end: bool) -> None:
        """Held-out losses now (`steps`, `tokens` into the segment); probes at a domain's end."""
        losses, gen = self.data.suite.losses(self.model, self.order)
        ins = self.data.suite.instruct_loss(self.model)
        self.trace.append({"step": self.done[0] + steps, "tokens": self.done[1] + tokens,
                           "seconds": self.meter.seconds, "segment": segment, "losses": losses,
                           "general": gen, "instruct": ins})  # fmt: skip
        if at_end:
            self.rows.append(losses)
            self.general.append(gen)
            self.instruct.append(ins)
            self.probe_rows.append(self.data.suite.probe_accuracy(self.model, self.tok, self.order))

    def finish(self) -> dict:
        """The record `Sequence.finish` writes, from this run's evaluations and counters."""
        model, trace, wall = self.model, self.trace, self.meter.seconds
        L = np.array(self.rows)
        P = np.array(self.probe_rows, dtype=float) if self.probe_rows[0] is not None else None
        intrinsic = None
        if self.bc.intrinsic:
            batches = self.data.suite.general_batches
            intrinsic = intrinsic_signals(model, self.tok, batches, seed=self.seed)
        tokens = trace[-1]["tokens"]
        fpt = train_flops_per_token(model, self.cfg.stream.seq_len)
        added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        return {
            "loss_matrix": L.tolist(),
            "probe_matrix": P.tolist() if P is not None else None,
            "general_loss": self.general,
            "instruct_loss": self.instruct if self.instruct[0] is not None else None,
            "trace": trace,
            "switch_steps": [trace[i]["step"] for i in switch_indices(trace)],
            "metrics": run_metrics(L, P, self.general, trace, instruct=self.instruct),
            "lr_trace": self.lrs,
            "cost": {
                "wall_seconds": wall,
                "tokens_trained": tokens,
                "tokens_streamed": self.streamed,
                "replaced_by_replay": self.replaced,
                "tokens_scored": 0,
                "train_tokens_per_s": tokens / wall if wall else None,
                "peak_rss_mb": peak_rss_mb(),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "added_params": added,
                "adapters": 1,
                "adapters_grown": 0,
                "total_params": sum(p.numel() for p in model.parameters()),
                "buffer_rows": len(self.pool),
                "buffer_bytes": sum(w.input_ids.nbytes + w.loss_mask.nbytes for w in self.pool),
                "flops_per_token": fpt,
                "mfu": (tokens * fpt / wall / (self.peak * 1e9)) if wall else None,
                "contention_cpu_seconds": self.meter.contention,
            },  # fmt: skip
            "intrinsic": intrinsic,
            "routing": None,
        }
