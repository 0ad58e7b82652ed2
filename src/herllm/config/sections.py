"""The configuration sections: one dataclass per concern, each field typed with what it may hold.

Every field carries a docstring (the attribute docstring right below it); `herllm adapt --help`
and the error messages read them. A field's own range or choices sit in its type (see
`herllm.config.fields`), checked as the section is read; `RunConfig.validate` adds the checks
that span fields. `KnowledgeConfig` lives in `herllm.config.knowledge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from herllm.config.fields import ConfigError, OneOf, Range, check_fields
from herllm.config.knowledge import KnowledgeConfig


def _selectors() -> tuple[str, ...]:
    from herllm.refine.select import selector_names

    return selector_names()


def _replay_policies() -> tuple[str, ...]:
    from herllm.memory.policies import replay_policy_names

    return replay_policy_names()


def _regularizers() -> tuple[str, ...]:
    from herllm.update import regularizers  # noqa: F401  (the built-in methods register)
    from herllm.update.registry import regularizer_names

    return regularizer_names()


@dataclass
class ModelConfig:
    name_or_path: str = "herllm-tiny"
    """Local HF model directory, hub id, or `herllm-tiny` (the bundled base model)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: `auto` (fp32 on CPU, bf16 on GPUs that support it), `float32` or `bfloat16`."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; only enable for models whose code you have read."""


@dataclass
class LoraConfig:
    r: Annotated[int, Range(gt=0)] = 16
    """LoRA rank."""
    alpha: Annotated[int, Range(gt=0)] = 32
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA input; 0 keeps the update step deterministic."""
    target_modules: list[str] | str = "auto"
    """Module names to adapt, or `auto` (attention and MLP projections of the architecture)."""


@dataclass
class StreamConfig:
    sources: list[str] = field(default_factory=list)
    """Text files, directories, JSONL files, or `-` for stdin."""
    include: list[str] = field(default_factory=lambda: ["*.txt", "*.md", "*.jsonl"])
    """Glob patterns that select files inside directories."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns removed from directory listings."""
    seq_len: Annotated[int, Range(ge=2)] = 128
    """Tokens per experience window."""
    on_bad_input: Literal["error", "skip"] = "error"
    """`error` stops at the first bad file or line; `skip` skips it and counts it."""
    stdin_format: Literal["text", "jsonl"] = "text"
    """How `-` (stdin) is read: `text` (documents end at a U+001E line) or `jsonl`."""
    follow: bool = False
    """Keep reading the sources as they grow (`herllm adapt --follow`): new JSONL lines, new
    text records, new files in a folder; the run waits for more instead of ending."""
    follow_poll: Annotated[float, Range(gt=0)] = 1.0
    """With `follow`: seconds between looks at the sources while there is nothing new."""
    follow_settle: Annotated[float, Range(ge=0)] = 0.0
    """With `follow`: a new file in a followed folder counts once unchanged this many seconds
    (0: at once; move finished files in instead)."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """How chat records train: `auto` renders `{"messages": [...]}` records through the model's
    chat template (the loss on the assistant turns only), and prompt/response records too when
    the model has one; `always` renders both (error without a template); `never` keeps
    prompt/response records plain (loss on the response) and refuses messages records."""


@dataclass
class SelectConfig:
    policy: Annotated[str, OneOf(_selectors)] = "all"
    """`all` trains on every new experience; `uncertain` on those the model knows least."""
    fraction: Annotated[float, Range(gt=0, le=1)] = 0.5
    """With `uncertain`: the share of experiences selected, relative to recent scores."""
    window: Annotated[int, Range(ge=1)] = 512
    """With `uncertain`: how many recent scores define the running threshold."""
    warmup: Annotated[int, Range(ge=0)] = 64
    """With `uncertain`: the first experiences are all selected while statistics build up."""
    score_batch_size: Annotated[int, Range(gt=0)] = 16
    """Experiences per no-grad scoring pass."""
    scores: Literal["pass", "step"] = "pass"
    """Where new experiences' scores come from: `pass`, a no-grad forward over each window before
    it is trained (selection can skip it); `step`, the training step's own forward (no extra
    pass; needs select.policy=all), so detection, the ledger and the buffer see a window one step
    later. Windows that `replay.mode=replace` leaves out are scored by a pass only while the
    detector confirms a candidate shift. Pair it with shift.reps=embed: with `model` the
    representations drift as the adapter learns and raise false shifts on long regions."""


@dataclass
class ReplayConfig:
    capacity: Annotated[int, Range(ge=0)] = 20000
    """Maximum rows in the replay buffer (0 disables replay and the buffer)."""
    policy: Annotated[str, OneOf(_replay_policies)] = "reservoir"
    """`reservoir` (uniform over everything seen) or `priority` (by last loss)."""
    ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Share of each training batch drawn from the buffer (0 = no replay)."""
    mode: Literal["add", "replace"] = "add"
    """How replayed rows (buffer and general) are paid for. `add`: they fill part of each batch
    and the stream is read more slowly, so a run trains more tokens than the stream holds
    (charged for the extra tokens). `replace`: each batch reads as many new windows as a run
    without replay and replayed rows take the place of some of them (those stay in the buffer and
    are counted as `replaced_by_replay`), so a run trains as many tokens as plain fine-tuning
    (the fixed-compute replay of Ibrahim et al. 2024)."""
    alpha: Annotated[float, Range(ge=0)] = 1.0
    """With `priority`: sampling probability proportional to score ** alpha."""
    refresh_scores: bool = True
    """With `priority`: re-score replayed rows with the current model as they are used."""
    general_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Share of each batch drawn from general text (protects general ability; 0 = none)."""
    general_sources: list[str] = field(default_factory=list)
    """General text files or folders; empty = the bundled general corpus."""
    general_windows: Annotated[int, Range(ge=1)] = 2000
    """General windows kept in memory to sample from."""
    rehearsal: Literal["never", "chat", "always"] = "never"
    """Self-rehearsal: the base model answers general instructions once at the start and its own
    answers are replayed as `rehearsal_ratio` of each batch (loss on the answers only), so an
    instruction-tuned model keeps answering as it did. `chat`: only for a model with a chat
    template; `always`: also without one (plain `Question:/Answer:` prompts)."""
    rehearsal_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.25
    """Share of each batch that is rehearsal answers, when rehearsal runs."""
    rehearsal_prompts: str = ""
    """Text file of instructions to rehearse, one per line; empty = the bundled 48."""
    rehearsal_tokens: Annotated[int, Range(ge=1)] = 64
    """Longest answer the base model gives to each rehearsal instruction (greedy)."""


@dataclass
class ProtectConfig:
    regularizers: list[Annotated[str, OneOf(_regularizers)]] = field(default_factory=list)
    """Penalties protecting earlier knowledge: any registered regularizer (ewc, mas, si, kl; empty =
    none)."""
    kl_reference: Literal["last", "base"] = "last"
    """With kl: anchor to the model at the last consolidation (`last`, LwF) or the `base` model."""
    strength: Annotated[float, Range(gt=0)] = 0.1
    """Each penalty's target size as a share of the LM loss (the weight is set online to keep it)."""
    dynamic: bool = True
    """Adapt the share online: up when earlier units are forgotten, down when nothing new is learned."""
    consolidate_batches: Annotated[int, Range(ge=1)] = 4
    """Batches of 8 windows from the closing unit's uniform sample used to estimate importances
    at a consolidation (one backward pass per window)."""
    consolidate_every: Annotated[int, Range(ge=0)] = 0
    """Also consolidate every this many steps (0 = only at detected shifts)."""
    reptile_every: Annotated[int, Range(ge=0)] = 0
    """Reptile meta-step every this many optimizer steps (0 disables meta-experience replay)."""
    reptile_epsilon: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Reptile interpolation: theta <- anchor + epsilon * (theta - anchor)."""
    observe_every: Annotated[int, Range(ge=1)] = 20
    """Steps between stability observations that adapt the penalty share."""


@dataclass
class ShiftConfig:
    detect: bool = False
    """Detect shifts in the stream (no labels): close the knowledge unit and consolidate."""
    warmup: Annotated[int, Range(ge=2)] = 64
    """Samples that set a new unit's score scale before detection starts."""
    cooldown: Annotated[int, Range(ge=0)] = 120
    """Samples after a shift during which no new one is raised."""
    rep_z_threshold: Annotated[float, Range(ge=0)] = 4.0
    """Confirmation level: how far (in standard errors) recent representations must move."""
    confirm_with_reps: bool = True
    """Require the representation statistic to confirm a score change before raising a shift."""
    reps: Literal["base", "model", "embed"] = "base"
    """Representations the detector watches: `base` (the frozen base model's pooled last hidden
    states, one more pass through the decoder per scored batch; training cannot read as a shift),
    `model` (the scoring pass's own, free, but they move as the adapters learn: over long regions
    that drift raises false shifts) or `embed` (the pooled input embeddings: free, and no adapter
    moves them unless lora.target_modules adapts the embeddings; they see words, not context)."""
    rep_channel: bool = True
    """Also raise candidates when representations move away from the unit's (not only when
    scores drift): a new region with familiar difficulty is still found."""


@dataclass
class ExpandConfig:
    grow: bool = False
    """Grow a new LoRA adapter when a detected shift leads far from every knowledge unit
    (needs shift.detect); a shift back near a unit trains that unit's adapter again."""
    compose: Literal["route", "sum"] = "route"
    """`route`: each input uses its nearest unit's adapter (see `fallback` for inputs far from
    every unit); `sum`: all adapters add up (O-LoRA)."""
    init: Literal["zero", "current"] = "zero"
    """A grown adapter starts at `zero` (no change, as O-LoRA) or as a copy of the `current`
    one, so learning goes on from where the stream was while the old adapter stays frozen."""
    orth_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """O-LoRA orthogonality penalty's target share of the LM loss (0 disables it)."""
    max_adapters: Annotated[int, Range(ge=2)] = 8
    """Live adapters at most; past it the two closest are merged (exactly, by stacking ranks)."""
    reuse_radius: Annotated[float, Range(gt=0)] = 1.3
    """A new region whose samples lie within this many median unit-distances of a unit reuses
    its adapter (measured on herllm-tiny: same domain 1.03-1.18, other domains 1.43-2.09)."""
    fallback_radius: Annotated[float, Range(gt=0)] = 2.5
    """Inputs farther than this (same unit) from their most likely unit use `fallback`; the
    radius widens by sqrt(key tokens / n) for an input of n tokens, shorter than the key's
    windows (a mean over few tokens is noisier)."""
    fallback: Literal["nearest", "recent", "base"] = "nearest"
    """What an input beyond `fallback_radius` uses: its most likely unit's adapter all the same
    (`nearest`), the adapter trained last (`recent`), or the base model (`base`, nothing learned).
    Measured on herllm-tiny (docs/benchmarks.md, short prompts): 50-character prompts routed
    right 0.96 / 0.62 (kjv -> pycode / austen -> shakespeare), against 0.48 / 0.08 with `base`
    and a fixed radius (as before this option)."""
    key_windows: Annotated[int, Range(ge=8)] = 64
    """Windows kept per unit (uniform reservoir) to fit its routing key."""


@dataclass
class TrainConfig:
    batch_size: Annotated[int, Range(gt=0)] = 8
    """Experiences per optimizer step (new + replay)."""
    lr: Annotated[float, Range(gt=0)] = 1e-3
    """Peak learning rate of AdamW (the LoRA adapters'; every benchmark figure uses it)."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    """AdamW weight decay on the trainable (adapter) parameters."""
    warmup_steps: Annotated[int, Range(ge=0)] = 20
    """Linear warm-up steps; the rate is constant afterwards (streams have no known end)."""
    rewarm_steps: Annotated[int, Range(ge=0)] = 0
    """Linear warm-up after what trains changes (an adapter grown, reused or merged gets a fresh
    optimizer); 0 = the full rate at once. A grown adapter starts from trained weights, and a
    20-step re-warm cost `her` 1.5% of final loss on 23-step domains (docs/benchmarks.md)."""
    max_steps: Annotated[int, Range(ge=0)] = 0
    """Stop after this many optimizer steps (0 = run until the stream ends)."""
    max_tokens: Annotated[int, Range(ge=0)] = 0
    """Stop after this many streamed tokens (0 = no limit)."""
    grad_clip: Annotated[float, Range(ge=0)] = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: Annotated[int, Range(ge=0, lt=2**32)] = 0
    """Seed for every random choice (replay sampling, dropout, initialisation)."""
    max_nonfinite: Annotated[int, Range(ge=0)] = 5
    """Consecutive non-finite losses tolerated (each skipped and rolled back) before stopping."""
    fsdp: bool = False
    """On N processes, shard the frozen base model's weights across them with FSDP2 (each
    decoder layer and the whole model; the LoRA adapters stay whole on every rank, their
    gradients averaged). Implied by `accelerate launch --use_fsdp`. No effect on one process."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free the gathered weights after each forward (least memory; gathered again for
    the backward); false keeps them until the backward (ZeRO-2-like)."""
    deepspeed: str = ""
    """On N processes, run the adapters' optimizer under DeepSpeed ZeRO: "1" or "2" (the stage),
    or the path of a DeepSpeed JSON config (stage 1 or 2, fp32, no optimizer or scheduler
    section: herllm builds its own); "" or "0" turns it off. Implied by `accelerate launch
    --use_deepspeed`, whose config wins. Needs `pip install 'herllm[deepspeed]'`. No effect on
    one process."""


@dataclass
class CheckpointConfig:
    every_steps: Annotated[int, Range(gt=0)] = 50
    """Checkpoint every this many optimizer steps (and always at the end)."""
    keep: Annotated[int, Range(ge=2)] = 2
    """Checkpoints kept on disk (at least 2, so a crash mid-write always leaves one)."""


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    """Held-out text files; mean token NLL on each is appended to metrics.jsonl."""
    every_steps: Annotated[int, Range(gt=0)] = 100
    """Evaluate every this many optimizer steps, and at the start and end of the run."""
    max_windows: Annotated[int, Range(ge=1)] = 64
    """Windows read per held-out file (keeps evaluation cheap)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Where checkpoints, the buffer, metrics and the report go."""
    strategy: str = "custom"
    """The named preset this configuration started from (informational; see herllm.strategies)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """What to learn from."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """What to train on."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """What to replay."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The update step."""
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    """Protection of earlier knowledge (regularizers, meta-experience replay)."""
    shift: ShiftConfig = field(default_factory=ShiftConfig)
    """Task-free shift detection."""
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    """Progressive expansion: new adapters for new regions, routed without task ids."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Durability."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    """The knowledge store: ingest of what the learner reads, retrieval into answers."""

    def validate(self) -> RunConfig:
        """Every field's own range and choices, then the checks across fields; raises
        ConfigError naming the field."""
        check_fields(self)
        if self.replay.ratio > 0 and self.replay.capacity <= 0:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} needs a buffer, but replay.capacity="
                f"{self.replay.capacity}; set replay.capacity > 0 or replay.ratio=0"
            )
        if self.replay_per_batch >= self.train.batch_size:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} leaves no new experiences in a batch of "
                f"train.batch_size={self.train.batch_size}; lower the ratio"
            )
        if self.replay_per_batch + self.general_per_batch >= self.train.batch_size:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} + replay.general_ratio={self.replay.general_ratio} "
                f"leave no new experiences in a batch of {self.train.batch_size}; lower them"
            )
        if (self.replay.rehearsal != "never" and self.replay_per_batch + self.general_per_batch
                + self.rehearsal_per_batch >= self.train.batch_size):  # fmt: skip
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} + replay.general_ratio={self.replay.general_ratio} "
                f"+ replay.rehearsal_ratio={self.replay.rehearsal_ratio} leave no new experiences "
                f"in a batch of {self.train.batch_size}; lower them or set replay.rehearsal=never"
            )
        if self.select.scores == "step" and self.select.policy != "all":
            raise ConfigError(
                f"select.scores=step scores a window in the step that trains it, so "
                f"select.policy={self.select.policy} cannot skip it; set select.policy=all or "
                "select.scores=pass"
            )
        if self.expand.grow and not self.shift.detect:
            raise ConfigError(
                "expand.grow=true grows adapters at detected shifts; set shift.detect=true"
            )
        self._validate_knowledge()
        if self.expand.grow and 0 < self.expand.orth_ratio < 0.01:
            raise ConfigError(
                f"expand.orth_ratio={self.expand.orth_ratio} must be 0 (off) or in [0.01, 1]"
            )
        return self

    def _validate_knowledge(self) -> None:
        kn = self.knowledge
        if kn.min_words > kn.max_words:
            raise ConfigError(
                f"knowledge.min_words={kn.min_words} > knowledge.max_words={kn.max_words}; "
                "make min_words <= max_words"
            )
        if kn.scope and (kn.scope.partition(":")[0] not in ("user", "agent", "run")
                         or not kn.scope.partition(":")[2].strip()):  # fmt: skip
            raise ConfigError(
                f"knowledge.scope={kn.scope!r} must be KIND:ID with KIND user, agent or run "
                "(e.g. run:notes), or empty for run:<run directory name>"
            )
        if kn.encoder not in ("minilm", "tiny", "none") and not kn.encoder.startswith("lm:"):
            raise ConfigError(
                f"knowledge.encoder={kn.encoder!r} must be minilm, tiny, none or lm:PATH"
            )

    @property
    def general_per_batch(self) -> int:
        """The most general-text rows a training batch holds (see `general_rows`)."""
        return most_rows(self.replay.general_ratio, self.train.batch_size)

    @property
    def replay_per_batch(self) -> int:
        """The most replay rows a training batch holds (see `replay_rows`)."""
        return most_rows(self.replay.ratio, self.train.batch_size)

    @property
    def rehearsal_per_batch(self) -> int:
        """The most rehearsal rows a training batch holds, when rehearsal runs."""
        return most_rows(self.replay.rehearsal_ratio, self.train.batch_size)

    def rehearsal_rows(self, step: int) -> int:
        """Rehearsal rows in the batch of optimizer step `step`, when rehearsal runs."""
        return rows_at(self.replay.rehearsal_ratio, self.train.batch_size, step)

    def general_rows(self, step: int) -> int:
        """General-text rows in the batch of optimizer step `step` (0-based)."""
        return rows_at(self.replay.general_ratio, self.train.batch_size, step)

    def replay_rows(self, step: int) -> int:
        """Replay rows in the batch of optimizer step `step` (0-based)."""
        return rows_at(self.replay.ratio, self.train.batch_size, step)


def most_rows(ratio: float, batch_size: int) -> int:
    """The most rows a `ratio` share of a batch takes at any step (see `rows_at`)."""
    return math.ceil(round(ratio * batch_size, 9))


def rows_at(ratio: float, batch_size: int, step: int) -> int:
    """Rows of a `ratio` share of a batch at step `step`: the share is kept on average over steps
    instead of rounded (12.5% of a batch of 4 is one row every other step, not none); a whole
    number of rows per batch gives that number at every step."""
    per = round(ratio * batch_size, 9)
    return math.floor((step + 1) * per) - math.floor(step * per)
