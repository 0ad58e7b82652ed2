"""Build everything the loop needs from a RunConfig, and save/restore it (checkpoints).

The learner's loop only reads and advances a `RunState`; this module turns config into plain
objects (model, optimizer, stream, buffer, selector) and implements the checkpoint protocol of
`herllm.atomic` around them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from herllm import atomic as ckpt
from herllm.acquire.chunks import Experience, Packer, StreamPosition, padded_experience, to_batch
from herllm.acquire.sources import SourceStats, read_documents
from herllm.config import RunConfig, save_yaml
from herllm.errors import UserError
from herllm.memory.general import GeneralSampler
from herllm.memory.ledger import Ledger, count_lines, truncate_lines
from herllm.memory.replay import ReplayBuffer
from herllm.models.load import ADAPTER_NAME, attach_lora, load_base
from herllm.parallel.ranks import Ranks
from herllm.refine.select import build_selector
from herllm.refine.shift import ShiftDetector
from herllm.update import adapters as ad
from herllm.update.protection import Protection, StabilityTracker
from herllm.update.strength import DynamicStrength

COUNTERS = (
    "general_replayed", "shifts", "consolidations", "reptile_steps",
    "windows_read", "tokens_streamed", "tokens_scored", "tokens_trained", "selected",
    "skipped_by_selection", "replayed", "nonfinite_skipped",
)  # fmt: skip


@dataclass
class RunState:
    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list[torch.nn.Parameter]
    selector: object
    buffer: ReplayBuffer | None
    packer: Packer
    source_stats: SourceStats
    eval_sets: dict[str, list[dict]]
    protection: Protection
    detector: ShiftDetector | None
    ledger: Ledger
    general: GeneralSampler | None
    train_model: torch.nn.Module
    """`model` as Accelerate prepared it (DDP-wrapped on N processes): only the training forward
    goes through it; scoring, protection, evaluation and saving use `model` itself."""
    ranks: Ranks
    sharded: dict | None = None
    """With an FSDP-sharded base: its parameter count and this rank's share (`Ranks.shard_model`)."""
    bank: ad.AdapterBank | None = None
    orth: DynamicStrength | None = None
    stability: StabilityTracker = field(default_factory=StabilityTracker)
    step: int = 0
    pending: list[Experience] = field(default_factory=list)
    stream_done: bool = False
    counters: dict = field(
        default_factory=lambda: dict.fromkeys(COUNTERS, 0) | {"train_seconds": 0.0}
    )
    eval_first: dict | None = None
    eval_last: dict | None = None
    evaluated_at_start: bool = False
    nonfinite_streak: int = 0
    last_checkpoint: int = -1
    started: float = field(default_factory=time.perf_counter)
    _windows: Iterator[Experience] | None = None
    _good: list[torch.Tensor] | None = None
    _open_key: tuple | None = None

    # -- stream -----------------------------------------------------------------------------
    def next_windows(self, n: int) -> list[Experience]:
        if self._windows is None:
            s = self.cfg.stream
            docs = read_documents(
                s.sources, s.include, s.exclude, s.on_bad_input, self.source_stats, s.stdin_format
            )
            self._windows = self.packer.windows(self.ranks.shard(docs))
        out = []
        for w in self._windows:
            out.append(w)
            if len(out) == n:
                break
        # Emptiness is judged on the whole stream: on N processes one rank's shard may be empty.
        if (not out and self.counters["windows_read"] == 0 and self.packer.position.windows == 0
                and self.source_stats.documents == 0):  # fmt: skip
            skipped = self.source_stats.skipped_count
            why = f" ({skipped} bad inputs skipped)" if skipped else ""
            raise UserError(
                f"the stream is empty: no text in {', '.join(self.cfg.stream.sources)}{why}; "
                "pass files that contain documents"
            )
        return out

    def row_to_experience(self, row) -> Experience:
        """A replay row (unpadded) back into a padded window."""
        return self.window_to_experience(row.input_ids, row.loss_mask, f"{row.doc_id}@{row.offset}")

    def window_to_experience(
        self, ids: np.ndarray, mask: np.ndarray | None, key: str = ""
    ) -> Experience:
        return padded_experience(key, -1, ids, mask, self.cfg.stream.seq_len, self.packer.pad_id)

    def placeholder_window(self) -> Experience:
        """Two pad tokens (one labelled): the input of a forward or training step a rank runs
        only to stay in step with the others (its result is dropped, its loss counts zero)."""
        return self.window_to_experience(np.array([self.packer.pad_id] * 2), None)

    def unit_batches(self) -> list[dict]:
        """A uniform sample of the current knowledge unit, as batches (for consolidation)."""
        from herllm.run.units import reservoir_batches

        if self.ledger.current is None:
            return []
        return reservoir_batches(self, self.ledger.current.reservoir)[
            : self.cfg.protect.consolidate_batches
        ]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # -- adapters ---------------------------------------------------------------------------
    def rebuild_optimizer(self) -> None:
        """A fresh optimizer (and warm-up) over what trains now, and on N processes a fresh DDP
        wrapper: after the trainable adapter changed (grown, reused or merged). Adam moments of
        the previous adapter are dropped."""
        acc = self.accelerator
        acc._optimizers = [o for o in acc._optimizers if o is not self.optimizer]
        acc._schedulers = [x for x in acc._schedulers if x is not self.scheduler]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._good = None
        if self.ranks.zero is not None:  # a new engine over what trains now
            self.optimizer.destroy()  # its gradient hooks would fire on a reused adapter
            optimizer, self.scheduler = make_optimizer(self.cfg, self.trainable)
            self.optimizer = zero_optimizer(self.cfg, self.model, optimizer, self.ranks.zero)
            self.train_model = self.optimizer.engine
            return
        self.train_model = None  # the old DDP wrapper must be released before the new one
        self.train_model = self.ranks.rewrap(self.model)
        self.optimizer, self.scheduler = make_optimizer(self.cfg, self.trainable)
        if not self.ranks.sharded:  # FSDP: herllm shards the model itself, Accelerate stays out
            self.optimizer, self.scheduler = acc.prepare(self.optimizer, self.scheduler)

    def unit_key(self, unit_id: str, reservoir) -> ad.RoutingKey | None:
        """Routing key of a unit from its reservoir windows (None with too few of them)."""
        from herllm.infer.adapted import fit_unit_key

        return fit_unit_key(self.model, reservoir, unit_id, self.bank.current, self.cfg.stream.seq_len,
                            self.packer.pad_id, self.accelerator.device)  # fmt: skip

    def inference_model(self):
        """The model as users query it: routed across adapters when the run grows them. The
        unit being learned gets a provisional key from what it has seen so far."""
        if self.bank is None:
            return self.model
        extra = []
        u = self.ledger.current
        if u is not None and self.bank.compose == "route":
            stamp = (u.id, u.seen, self.bank.current)
            if self._open_key is None or self._open_key[0] != stamp:
                self._open_key = (stamp, self.unit_key(u.id, u.reservoir))
            if self._open_key[1] is not None:
                extra.append(self._open_key[1])
        return ad.RoutedModel(self.accelerator.unwrap_model(self.model), self.bank, extra)

    # -- safety -----------------------------------------------------------------------------
    def snapshot_good_weights(self) -> None:
        if self._good is None:
            self._good = [p.detach().clone() for p in self.trainable]
        else:
            for dst, p in zip(self._good, self.trainable, strict=True):
                dst.copy_(p.detach())

    def restore_good_weights(self) -> None:
        if self._good is not None:
            with torch.no_grad():
                for p, src in zip(self.trainable, self._good, strict=True):
                    p.copy_(src)
            self.weights_written()

    def optimizer_state(self) -> dict | None:
        """The optimizer's state dict on rank 0 (None elsewhere). Every rank calls it: under
        DeepSpeed the state is partitioned and gathering it is a collective."""
        if not self.ranks.main and self.ranks.zero is None:
            return None
        state = self.optimizer.state_dict()
        return state if self.ranks.main else None

    def weights_written(self) -> None:
        """The trainable weights were written outside the optimizer (the fall-back above, a
        Reptile step): under DeepSpeed they are copied into the engine's fp32 partitions too."""
        if self.ranks.zero is not None:
            self.optimizer.weights_written()

    # -- logs -------------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def log_event(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def evaluate_heldout(self) -> dict[str, float]:
        model = self.inference_model()
        return {name: self.ranks.mean_nll(model, b) for name, b in self.eval_sets.items()}


def build_state(cfg: RunConfig, resume: bool) -> RunState:
    """Model, optimizer, stream, buffer and selector for a new or resumed run."""
    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "checkpoints").exists():
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume {run_dir} to continue "
            "it or choose another --run-dir"
        )
    for src in cfg.stream.sources:
        if (
            src != "-"
            and Path(src).is_dir()
            and run_dir.resolve().is_relative_to(Path(src).resolve())
        ):
            raise UserError(
                f"run directory {run_dir} is inside stream source {src}: the run would read its "
                "own files back; choose a --run-dir outside the sources"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    # One scheduler step per optimizer step: Accelerate would otherwise step it N times on N ranks.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False
    )
    # refuses a launcher/Accelerate world-size mismatch, and the engines herllm cannot run under
    ranks = Ranks(accelerator, cfg.train)
    base, tokenizer = load_base(cfg.model)
    model = attach_lora(base, cfg.lora)
    sharded = None
    if ranks.sharded:  # FSDP2 over the frozen base; the adapters stay whole (see shard_model)
        sharded = ranks.shard_model(model)  # moves to the device one unit at a time
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, trainable)
    if ranks.sharded:
        train_model = model
    elif ranks.zero is not None:  # DeepSpeed ZeRO-1/2 owns the adapters' optimizer state
        optimizer = zero_optimizer(cfg, model, optimizer, ranks.zero)
        train_model = optimizer.engine
    else:
        train_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model = accelerator.unwrap_model(train_model)
    buffer = None
    if cfg.replay.capacity > 0 and ranks.main:  # rank 0 is the buffer's one writer
        buffer = ReplayBuffer(
            run_dir / "replay.sqlite",
            cfg.replay.capacity,
            cfg.replay.policy,
            cfg.train.seed,
            cfg.replay.alpha,
        )
    if accelerator.is_main_process and not resume:
        save_yaml(cfg, run_dir / "config.yaml")
    sel = cfg.select
    sh = cfg.shift
    detector = None
    if sh.detect:
        detector = ShiftDetector(channels=("nll", "entropy"), warmup=sh.warmup, cooldown=sh.cooldown,
                                 rep_z_threshold=sh.rep_z_threshold, confirm_with_reps=sh.confirm_with_reps,
                                 rep_channel=sh.rep_channel)  # fmt: skip
    general = None
    if cfg.replay.general_ratio > 0:
        general = GeneralSampler(tokenizer, cfg.stream.seq_len, cfg.replay.general_sources,
                                 cfg.replay.general_windows, cfg.train.seed)  # fmt: skip
    ex = cfg.expand
    bank = orth = None
    if ex.grow:
        bank = ad.AdapterBank(ADAPTER_NAME, ex.compose, ex.reuse_radius, ex.fallback_radius, ex.max_adapters)  # fmt: skip
        orth = DynamicStrength(target_ratio=ex.orth_ratio) if ex.orth_ratio > 0 else None
    reservoir = max(32, ex.key_windows) if ex.grow else 32
    return RunState(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        selector=build_selector(sel.policy, sel.fraction, sel.window, sel.warmup),
        buffer=buffer,
        packer=Packer(tokenizer, cfg.stream.seq_len),
        source_stats=SourceStats(),
        eval_sets=load_eval_sets(cfg, tokenizer, accelerator.device),
        protection=Protection(cfg.protect, mean_over_ranks=ranks.mean),
        detector=detector,
        ledger=Ledger(run_dir, reservoir, seed=cfg.train.seed, writer=accelerator.is_main_process),
        general=general,
        train_model=train_model,
        ranks=ranks,
        sharded=sharded,
        bank=bank,
        orth=orth,
    )


def zero_optimizer(cfg: RunConfig, model, optimizer, config: dict):
    """`optimizer` inside a DeepSpeed ZeRO-1/2 engine (`herllm.parallel.zero`); SI reads each step's
    whole gradient, so it is gathered only when SI runs."""
    from herllm.parallel.zero import ZeroOptimizer

    return ZeroOptimizer(model, optimizer, config, keep_grads="si" in cfg.protect.regularizers)


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]):
    """AdamW over `params` with a linear warm-up, then a constant rate (streams have no end)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warm = max(cfg.train.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warm))
    return optimizer, scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_eval_sets(cfg: RunConfig, tokenizer, device, batch_size: int = 8) -> dict[str, list[dict]]:
    """Pack each held-out file into at most `max_windows` windows, batched on the device."""
    out: dict[str, list[dict]] = {}
    for path in cfg.eval.files:
        packer = Packer(tokenizer, cfg.stream.seq_len)
        windows = []
        for w in packer.windows(read_documents([path], ["*"], [], "error")):
            windows.append(w)
            if len(windows) >= cfg.eval.max_windows:
                break
        out[Path(path).name if Path(path).name not in out else path] = [
            {k: v.to(device) for k, v in to_batch(windows[i : i + batch_size]).items()}
            for i in range(0, len(windows), batch_size)
        ]
    return out


# -- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(s: RunState) -> None:
    """Write checkpoint step-N atomically, then commit the buffer with it (see checkpoint.py)."""
    if s.last_checkpoint == s.step:
        return
    root = s.run_dir / "checkpoints"
    ranks = s.ranks.gather_rank_states(s)  # N processes: every rank's cursor, pending, RNG
    s.ranks.settle(s.model)  # FSDP: every rank frees its gathered weights before rank 0 saves
    optim = s.optimizer_state()
    if s.accelerator.is_main_process:
        tmp = ckpt.begin(root, s.step)
        save_adapters(s, tmp / "adapters")
        state = trainer_state(s, optim) | ({"ranks": ranks} if ranks else {})
        torch.save(state, tmp / "trainer.pt")
        s.ranks.save_cursor(tmp / "cursor.json", s, ranks)
        ckpt.publish(tmp)
        if s.buffer is not None:
            s.buffer.commit(s.step)
        ckpt.prune(root, s.cfg.checkpoint.keep, s.buffer.committed_step if s.buffer else None)
    s.accelerator.wait_for_everyone()
    s.last_checkpoint = s.step


def trainer_state(s: RunState, optimizer: dict) -> dict:
    counters = dict(s.counters)
    counters["train_seconds"] = s.counters["train_seconds"] + (time.perf_counter() - s.started)
    return {
        "step": s.step,
        "optimizer": optimizer,
        "scheduler": s.scheduler.state_dict(),
        "rng": ckpt.rng_state(),
        "selector": s.selector.state_dict(),
        "pending": [vars(e) for e in s.pending],
        "stream_done": s.stream_done,
        "counters": counters,
        "eval_first": s.eval_first,
        "eval_last": s.eval_last,
        "evaluated_at_start": s.evaluated_at_start,
        "nonfinite_streak": s.nonfinite_streak,
        "protection": s.protection.state_dict(),
        "detector": s.detector.state_dict() if s.detector is not None else None,
        "ledger": s.ledger.state_dict(),
        "general": s.general.state_dict() if s.general is not None else None,
        "stability": s.stability.state_dict(),
        "bank": s.bank.state_dict() if s.bank is not None else None,
        "orth": s.orth.state_dict() if s.orth is not None else None,
        "metrics_lines": count_lines(s.run_dir / "metrics.jsonl"),
        "events_lines": count_lines(s.run_dir / "events.jsonl"),
    }


def load_checkpoint(s: RunState) -> None:
    """Restore the run from the checkpoint that the buffer committed (or the newest one)."""
    root = s.run_dir / "checkpoints"
    committed = s.buffer.committed_step if s.buffer else None  # rank 0 prunes, the others follow
    path = s.ranks.on_main(lambda: ckpt.resume_point(root, committed))
    if path is None:
        return  # crashed before the first checkpoint: nothing was committed, start afresh
    state = torch.load(path / "trainer.pt", weights_only=False)
    if state.get("bank") is not None and s.bank is not None:
        s.bank = ad.AdapterBank.from_state(state["bank"])
        s.orth.load_state_dict(state["orth"]) if s.orth is not None and state["orth"] else None
    load_adapters(s.model, path / "adapters", s.bank)
    if s.bank is not None:
        ad.activate(s.model, s.bank)
        s.rebuild_optimizer()
    s.weights_written()  # DeepSpeed: the loaded adapters into the engine's fp32 partitions
    position = s.ranks.resume_rank(state, path / "cursor.json", s.cfg.stream.sources)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.selector.load_state_dict(state["selector"])
    ckpt.set_rng_state(state["rng"])
    s.step = state["step"]
    s.pending = [Experience(**e) for e in state["pending"]]
    s.stream_done = state["stream_done"]
    s.counters.update(state["counters"])
    s.eval_first, s.eval_last = state["eval_first"], state["eval_last"]
    s.evaluated_at_start = state["evaluated_at_start"]
    s.nonfinite_streak = state["nonfinite_streak"]
    s.protection.load_state_dict(state["protection"])
    if s.detector is not None and state["detector"] is not None:
        s.detector.load_state_dict(state["detector"])
    s.ledger.load_state_dict(state["ledger"])  # also drops ledger lines written after it
    if s.general is not None and state["general"] is not None:
        s.general.load_state_dict(state["general"])
    s.stability.load_state_dict(state["stability"])
    if s.accelerator.is_main_process:  # what was logged after the checkpoint happens again
        truncate_lines(s.run_dir / "metrics.jsonl", state["metrics_lines"])
        if "events_lines" in state:  # checkpoints before 2026-11-22 did not count them
            truncate_lines(s.run_dir / "events.jsonl", state["events_lines"])
    s.packer = Packer(s.tokenizer, s.cfg.stream.seq_len, position,
                      s.ranks.sharding.offsets(s.ranks.rank))  # fmt: skip
    s.last_checkpoint = s.step


def save_adapters(s: RunState, root: Path) -> None:
    """Every adapter in PEFT format, one folder per adapter (`root/<name>/`), and the routing
    keys beside them (`root/routing.json`)."""
    model = s.accelerator.unwrap_model(s.model)
    names = list(s.bank.adapters) if s.bank is not None else [ADAPTER_NAME]
    for name in names:
        # PEFT writes a non-default adapter into a sub-folder named after it
        model.save_pretrained(
            root / ADAPTER_NAME if name == ADAPTER_NAME else root, selected_adapters=[name]
        )
    (root / "README.md").unlink(missing_ok=True)  # PEFT's model card for a sub-folder adapter
    if s.bank is not None:
        (root / "routing.json").write_text(json.dumps(s.bank.state_dict(), default=_jsonable))


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def load_adapters(model, root: Path, bank) -> None:
    """Load the adapters saved by `save_adapters` into `model`, creating the missing ones."""
    from peft import LoraConfig as PeftLoraConfig

    names = list(bank.adapters) if bank is not None else [ADAPTER_NAME]
    for name in names:
        folder = root / name
        if not (folder / "adapter_model.safetensors").is_file():
            raise UserError(f"adapter folder {folder} is missing; the run directory is incomplete")
        if name not in model.peft_config:
            model.add_adapter(name, PeftLoraConfig.from_pretrained(str(folder)))
        result = set_peft_model_state_dict(
            model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name
        )
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise UserError(
                f"adapter {folder} does not match the model: unexpected {unexpected[:3]}"
            )
    if bank is not None:
        for name in [n for n in model.peft_config if n not in bank.adapters]:
            model.delete_adapter(name)  # e.g. the initial adapter, merged away before the save


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors by name (for comparisons and tests)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


__all__ = ["RunState", "build_state", "load_checkpoint", "save_checkpoint", "StreamPosition"]
