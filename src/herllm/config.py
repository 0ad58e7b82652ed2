"""Typed configuration: one dataclass per concern, YAML <-> dataclass, CLI overrides.

Every field carries a docstring (the attribute docstring right below it); `herllm adapt --help`
and the error messages read them. Unknown keys and impossible combinations raise `ConfigError`
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from herllm.errors import UserError


class ConfigError(UserError):
    """A user mistake in the configuration: one line, what/where/how to fix."""


@dataclass
class ModelConfig:
    name_or_path: str = "herllm-tiny"
    """Local HF model directory, hub id, or `herllm-tiny` (the bundled base model)."""
    dtype: str = "auto"
    """Compute dtype: `auto` (fp32 on CPU, bf16 on GPUs that support it), `float32` or `bfloat16`."""
    trust_remote_code: bool = False
    """Passed to `from_pretrained`; only enable for models whose code you have read."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
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
    seq_len: int = 128
    """Tokens per experience window."""
    on_bad_input: str = "error"
    """`error` stops at the first bad file or line; `skip` skips it and counts it."""
    stdin_format: str = "text"
    """How `-` (stdin) is read: `text` (documents end at a U+001E line) or `jsonl`."""


@dataclass
class SelectConfig:
    policy: str = "all"
    """`all` trains on every new experience; `uncertain` on those the model knows least."""
    fraction: float = 0.5
    """With `uncertain`: the share of experiences selected, relative to recent scores."""
    window: int = 512
    """With `uncertain`: how many recent scores define the running threshold."""
    warmup: int = 64
    """With `uncertain`: the first experiences are all selected while statistics build up."""
    score_batch_size: int = 16
    """Experiences per no-grad scoring pass."""


@dataclass
class ReplayConfig:
    capacity: int = 20000
    """Maximum rows in the replay buffer (0 disables replay and the buffer)."""
    policy: str = "reservoir"
    """`reservoir` (uniform over everything seen) or `priority` (by last loss)."""
    ratio: float = 0.0
    """Share of each training batch drawn from the buffer (0 = no replay)."""
    alpha: float = 1.0
    """With `priority`: sampling probability proportional to score ** alpha."""
    refresh_scores: bool = True
    """With `priority`: re-score replayed rows with the current model as they are used."""
    general_ratio: float = 0.0
    """Share of each batch drawn from general text (protects general ability; 0 = none)."""
    general_sources: list[str] = field(default_factory=list)
    """General text files or folders; empty = the bundled general corpus."""
    general_windows: int = 2000
    """General windows kept in memory to sample from."""


@dataclass
class ProtectConfig:
    regularizers: list[str] = field(default_factory=list)
    """Penalties protecting earlier knowledge: any of ewc, mas, si, kl (empty = none)."""
    kl_reference: str = "last"
    """With kl: anchor to the model at the last consolidation (`last`, LwF) or the `base` model."""
    strength: float = 0.1
    """Each penalty's target size as a share of the LM loss (the weight is set online to keep it)."""
    dynamic: bool = True
    """Adapt the share online: up when earlier units are forgotten, down when nothing new is learned."""
    consolidate_batches: int = 4
    """Batches of 8 windows from the closing unit's uniform sample used to estimate importances
    at a consolidation (one backward pass per window)."""
    consolidate_every: int = 0
    """Also consolidate every this many steps (0 = only at detected shifts)."""
    reptile_every: int = 0
    """Reptile meta-step every this many optimizer steps (0 disables meta-experience replay)."""
    reptile_epsilon: float = 0.5
    """Reptile interpolation: theta <- anchor + epsilon * (theta - anchor)."""
    observe_every: int = 20
    """Steps between stability observations that adapt the penalty share."""


@dataclass
class ShiftConfig:
    detect: bool = False
    """Detect shifts in the stream (no labels): close the knowledge unit and consolidate."""
    warmup: int = 100
    """Samples that set a new unit's score scale before detection starts."""
    cooldown: int = 300
    """Samples after a shift during which no new one is raised."""
    rep_z_threshold: float = 4.0
    """Confirmation level: how far (in standard errors) recent representations must move."""
    confirm_with_reps: bool = True
    """Require the representation statistic to confirm a score change before raising a shift."""
    reps: str = "base"
    """Representations the detector watches: `base` (the frozen base model's pooled last hidden
    states, one more pass through the decoder per scored batch; training cannot read as a shift)
    or `model` (the scoring pass's own, free, but they move as the adapters learn)."""
    rep_channel: bool = True
    """Also raise candidates when representations move away from the unit's (not only when
    scores drift): a new region with familiar difficulty is still found."""


@dataclass
class ExpandConfig:
    grow: bool = False
    """Grow a new LoRA adapter when a detected shift leads far from every knowledge unit
    (needs shift.detect); a shift back near a unit trains that unit's adapter again."""
    compose: str = "route"
    """`route`: each input uses its nearest unit's adapter (base when far from all); `sum`: all
    adapters add up (O-LoRA)."""
    init: str = "zero"
    """A grown adapter starts at `zero` (no change, as O-LoRA) or as a copy of the `current`
    one, so learning goes on from where the stream was while the old adapter stays frozen."""
    orth_ratio: float = 0.1
    """O-LoRA orthogonality penalty's target share of the LM loss (0 disables it)."""
    max_adapters: int = 8
    """Live adapters at most; past it the two closest are merged (exactly, by stacking ranks)."""
    reuse_radius: float = 1.3
    """A new region whose samples lie within this many median unit-distances of a unit reuses
    its adapter (measured on herllm-tiny: same domain 1.03-1.18, other domains 1.43-2.09)."""
    fallback_radius: float = 2.5
    """Inputs farther than this (same unit) from their most likely unit use the base model."""
    key_windows: int = 64
    """Windows kept per unit (uniform reservoir) to fit its routing key."""


@dataclass
class TrainConfig:
    batch_size: int = 8
    """Experiences per optimizer step (new + replay)."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trainable (adapter) parameters."""
    warmup_steps: int = 20
    """Linear warm-up steps; the rate is constant afterwards (streams have no known end)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run until the stream ends)."""
    max_tokens: int = 0
    """Stop after this many streamed tokens (0 = no limit)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seed for every random choice (replay sampling, dropout, initialisation)."""
    max_nonfinite: int = 5
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
    every_steps: int = 50
    """Checkpoint every this many optimizer steps (and always at the end)."""
    keep: int = 2
    """Checkpoints kept on disk (at least 2, so a crash mid-write always leaves one)."""


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    """Held-out text files; mean token NLL on each is appended to metrics.jsonl."""
    every_steps: int = 100
    """Evaluate every this many optimizer steps, and at the start and end of the run."""
    max_windows: int = 64
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

    def validate(self) -> RunConfig:
        """Cross-field checks; raises ConfigError naming the field."""
        _choice("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16"))
        _choice("stream.on_bad_input", self.stream.on_bad_input, ("error", "skip"))
        _choice("stream.stdin_format", self.stream.stdin_format, ("text", "jsonl"))
        _choice("select.policy", self.select.policy, ("all", "uncertain"))
        _choice("replay.policy", self.replay.policy, ("reservoir", "priority"))
        _choice("shift.reps", self.shift.reps, ("base", "model"))
        _positive("lora.r", self.lora.r)
        _positive("stream.seq_len", self.stream.seq_len)
        _positive("train.batch_size", self.train.batch_size)
        _positive("select.score_batch_size", self.select.score_batch_size)
        _positive("checkpoint.every_steps", self.checkpoint.every_steps)
        _positive("eval.every_steps", self.eval.every_steps)
        if not 0.0 < self.select.fraction <= 1.0:
            raise ConfigError(f"select.fraction={self.select.fraction} must be in (0, 1]")
        if not 0.0 <= self.replay.ratio < 1.0:
            raise ConfigError(f"replay.ratio={self.replay.ratio} must be in [0, 1)")
        if self.replay.ratio > 0 and self.replay.capacity <= 0:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} needs a buffer, but replay.capacity="
                f"{self.replay.capacity}; set replay.capacity > 0 or replay.ratio=0"
            )
        if self.replay.capacity < 0:
            raise ConfigError(f"replay.capacity={self.replay.capacity} must be >= 0")
        if self.replay_per_batch >= self.train.batch_size:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} leaves no new experiences in a batch of "
                f"train.batch_size={self.train.batch_size}; lower the ratio"
            )
        for name in self.protect.regularizers:
            _choice("protect.regularizers", name, ("ewc", "mas", "si", "kl"))
        _choice("protect.kl_reference", self.protect.kl_reference, ("last", "base"))
        if self.protect.strength <= 0:
            raise ConfigError(f"protect.strength={self.protect.strength} must be > 0")
        if not 0.0 < self.protect.reptile_epsilon <= 1.0:
            raise ConfigError(
                f"protect.reptile_epsilon={self.protect.reptile_epsilon} must be in (0, 1]"
            )
        if not 0.0 <= self.replay.general_ratio < 1.0:
            raise ConfigError(f"replay.general_ratio={self.replay.general_ratio} must be in [0, 1)")
        if self.replay_per_batch + self.general_per_batch >= self.train.batch_size:
            raise ConfigError(
                f"replay.ratio={self.replay.ratio} + replay.general_ratio={self.replay.general_ratio} "
                f"leave no new experiences in a batch of {self.train.batch_size}; lower them"
            )
        _choice("expand.compose", self.expand.compose, ("route", "sum"))
        _choice("expand.init", self.expand.init, ("zero", "current"))
        if self.expand.grow and not self.shift.detect:
            raise ConfigError(
                "expand.grow=true grows adapters at detected shifts; set shift.detect=true"
            )
        if self.expand.max_adapters < 2:
            raise ConfigError(f"expand.max_adapters={self.expand.max_adapters} must be >= 2")
        if self.expand.orth_ratio < 0:
            raise ConfigError(f"expand.orth_ratio={self.expand.orth_ratio} must be >= 0")
        if self.expand.key_windows < 8:
            raise ConfigError(f"expand.key_windows={self.expand.key_windows} must be >= 8")
        if self.checkpoint.keep < 2:
            raise ConfigError(f"checkpoint.keep={self.checkpoint.keep} must be >= 2")
        if self.lora.dropout < 0 or self.lora.dropout >= 1:
            raise ConfigError(f"lora.dropout={self.lora.dropout} must be in [0, 1)")
        return self

    @property
    def general_per_batch(self) -> int:
        """General-text rows in each training batch."""
        return int(round(self.replay.general_ratio * self.train.batch_size))

    @property
    def replay_per_batch(self) -> int:
        """Replay rows in each training batch."""
        return int(round(self.replay.ratio * self.train.batch_size))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be > 0")


# ---------------------------------------------------------------------------------------------
# dict / YAML <-> dataclass


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right below each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value
    return docs


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r}; allowed here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain-dict view of a dataclass (for YAML)."""
    return dataclasses.asdict(obj)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, path)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if isinstance(value, str) and str in options:
            return value
        for opt in options:
            if opt is not str and opt is not type(None):
                return _coerce(opt, value, path)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(item_tp, v, path) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} must be true or false")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be {tp.__name__}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{path}={value!r} must be a string")
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the --config path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p}{line} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def build_config(
    yaml_path: str | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Merge base dict <- YAML file <- overrides, then build and validate a RunConfig."""
    data: dict[str, Any] = _deep_merge(base or {}, load_yaml(yaml_path) if yaml_path else {})
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data).validate()


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
