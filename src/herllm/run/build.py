"""Config -> the plain objects the loop needs (model, engine, stream, buffer, selector, ...), and
their registration in the run's state registry.

Builders turn config into constructor arguments, so modules never read the config themselves
(torchtune's builders). `register_components` is the one list of what a checkpoint holds.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from herllm.acquire.chunks import Experience, Packer, to_batch
from herllm.acquire.follow import FollowedSources
from herllm.acquire.sources import SourceStats, read_documents
from herllm.config import RunConfig, save_yaml
from herllm.errors import UserError
from herllm.memory import rehearsal
from herllm.memory.general import GeneralSampler
from herllm.memory.knowledge.ingest import build_ingest
from herllm.memory.ledger import Ledger
from herllm.memory.replay import ReplayBuffer
from herllm.models.load import ADAPTER_NAME, attach_lora, load_base
from herllm.parallel.engine import build_engine
from herllm.parallel.ranks import Ranks
from herllm.refine.select import selector_from_config
from herllm.refine.shift import ShiftDetector
from herllm.run.components import AdapterWeights, Counters, EngineState, LogLines, RngState
from herllm.run.state import RunState
from herllm.run.stateful import Field
from herllm.update import adapters as ad
from herllm.update.protection import Protection
from herllm.update.registry import needs_full_grads
from herllm.update.strength import DynamicStrength


def check_run_dir(cfg: RunConfig, resume: bool) -> Path:
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
    return run_dir


def build_state(cfg: RunConfig, resume: bool) -> RunState:
    """Model, engine, stream, buffer and selector for a new or resumed run."""
    run_dir = check_run_dir(cfg, resume)
    seed_everything(cfg.train.seed)
    # One scheduler step per optimizer step: Accelerate would otherwise step it N times on N ranks.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False
    )
    # refuses a launcher/Accelerate world-size mismatch, and the engines herllm cannot run under
    ranks = Ranks(accelerator, cfg.train)
    base, tokenizer = load_base(cfg.model)
    rehearsed = build_rehearsal(cfg, run_dir, base, tokenizer, accelerator.is_main_process)
    model = attach_lora(base, cfg.lora)
    sharded = None
    if ranks.sharded:  # FSDP2 over the frozen base; the adapters stay whole (see shard_model)
        sharded = ranks.shard_model(model)  # moves to the device one unit at a time
    engine = build_engine(cfg.train, model, ranks, accelerator,
                          keep_grads=needs_full_grads(cfg.protect.regularizers))  # fmt: skip
    buffer = None
    if cfg.replay.capacity > 0 and ranks.main:  # rank 0 is the buffer's one writer
        buffer = ReplayBuffer(run_dir / "replay.sqlite", cfg.replay.capacity, cfg.replay.policy,
                              cfg.train.seed, cfg.replay.alpha)  # fmt: skip
    if accelerator.is_main_process and not resume:
        save_yaml(cfg, run_dir / "config.yaml")
    sel, sh, ex = cfg.select, cfg.shift, cfg.expand
    detector = None
    if sh.detect:
        detector = ShiftDetector(channels=("nll", "entropy"), warmup=sh.warmup, cooldown=sh.cooldown,
                                 rep_z_threshold=sh.rep_z_threshold, confirm_with_reps=sh.confirm_with_reps,
                                 rep_channel=sh.rep_channel)  # fmt: skip
    general = None
    if cfg.replay.general_ratio > 0:
        general = GeneralSampler(tokenizer, cfg.stream.seq_len, cfg.replay.general_sources,
                                 cfg.replay.general_windows, cfg.train.seed)  # fmt: skip
    bank = orth = None
    if ex.grow:
        bank = ad.AdapterBank(ADAPTER_NAME, ex.compose, ex.reuse_radius, ex.fallback_radius, ex.max_adapters,
                              ex.fallback)  # fmt: skip
        orth = DynamicStrength(target_ratio=ex.orth_ratio) if ex.orth_ratio > 0 else None
    reservoir = max(32, ex.key_windows) if ex.grow else 32
    stats = SourceStats()
    follower = None
    if cfg.stream.follow:
        if ranks.world > 1:
            raise UserError(
                f"--follow runs on one process (this launch has {ranks.world}): a growing "
                "source cannot be dealt to ranks ahead of time; launch it without torchrun"
            )
        st = cfg.stream
        follower = FollowedSources(st.sources, st.include, st.exclude, st.on_bad_input, stats,
                                   st.follow_settle)  # fmt: skip
    # rank 0 is the knowledge store's one writer, as it is the buffer's
    ingest = build_ingest(run_dir, cfg.knowledge) if cfg.knowledge.ingest and ranks.main else None
    s = RunState(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        model=engine.model,
        tokenizer=tokenizer,
        engine=engine,
        selector=selector_from_config(sel),
        buffer=buffer,
        packer=Packer(tokenizer, cfg.stream.seq_len, chat_template=cfg.stream.chat_template),
        source_stats=stats,
        eval_sets=load_eval_sets(cfg, tokenizer, accelerator.device),
        protection=Protection(cfg.protect, mean_over_ranks=ranks.mean),
        detector=detector,
        ledger=Ledger(
            run_dir,
            reservoir,
            seed=cfg.train.seed,
            writer=accelerator.is_main_process,
            keep_reps=ex.grow,  # the routing keys' base representations, from scoring
        ),
        general=general,
        rehearsal=rehearsal.RehearsalSampler(rehearsed, cfg.train.seed) if rehearsed else None,
        ranks=ranks,
        sharded=sharded,
        bank=bank,
        orth=orth,
        follower=follower,
        ingest=ingest,
    )
    register_components(s)
    return s


def build_rehearsal(cfg: RunConfig, run_dir: Path, base, tokenizer, main: bool) -> list[Experience]:
    """The base model's own answers to the rehearsal instructions as windows (`memory.rehearsal`),
    or [] when rehearsal is off, `chat` and the model has no chat template, or its share of a
    batch is 0."""
    rp = cfg.replay
    if cfg.rehearsal_per_batch == 0 or not rehearsal.active(rp.rehearsal, tokenizer):
        return []
    pairs = rehearsal.rehearsal_pairs(run_dir, base, tokenizer, rehearsal.read_instructions(
        rp.rehearsal_prompts), rp.rehearsal_tokens, cfg.stream.seq_len, write=main)  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return rehearsal.rehearsal_windows(pairs, cfg.stream.seq_len, pad)


def register_components(s: RunState) -> None:
    """Everything a checkpoint saves and a resume restores, in load order (`run.stateful`):
    the adapters before the optimizer over them; the RNG before what draws from it next."""
    r = s.registry
    r.register("bank", AdapterWeights(s), snapshot=True)  # routing bank + the PEFT folders
    r.register("orth", s.orth)
    r.register("optimizer", EngineState(s.engine, "optimizer"), snapshot=True)
    r.register("scheduler", EngineState(s.engine, "scheduler"), snapshot=True)
    r.register("selector", s.selector)
    r.register("rng", RngState(), per_rank=True)
    r.register("step", Field(s, "step"))
    r.register("pending", Field(s, "pending", lambda p: [vars(e) for e in p],
                                lambda p: [Experience(**e) for e in p]), per_rank=True)  # fmt: skip
    r.register("stream_done", Field(s, "stream_done"), per_rank=True)
    r.register("follow", s.follower, required=False)  # a followed folder's order of files
    r.register("counters", Counters(s))
    for name in ("eval_first", "eval_last", "evaluated_at_start", "nonfinite_streak"):
        r.register(name, Field(s, name))
    r.register("protection", s.protection, snapshot=True, digest=True)
    r.register("detector", s.detector)
    r.register("ledger", s.ledger)  # also drops ledger lines written after it
    r.register("general", s.general)
    r.register("rehearsal", s.rehearsal, required=False)  # since 2026-12-07
    r.register("stability", s.stability)
    r.register("metrics_lines", LogLines(s, "metrics.jsonl"))
    r.register("events_lines", LogLines(s, "events.jsonl"), required=False)  # since 2026-11-22
    # s.ingest needs no entry: the store itself says which documents it holds (ingest.py).


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


__all__ = ["build_state", "register_components", "seed_everything", "load_eval_sets"]
