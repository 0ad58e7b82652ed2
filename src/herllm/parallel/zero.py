"""DeepSpeed ZeRO-1/2 for the adapters' optimizer on N processes (`train.deepspeed`, or
`accelerate launch --use_deepspeed`).

ZeRO stages 1 and 2 partition the optimizer state (and, stage 2, the reduced gradients) of what
trains across the ranks; the model's parameters stay whole on every rank. herllm hands its own
AdamW over the trainable adapters to `deepspeed.initialize` and keeps the loop's order:

- the training forward and backward go through the engine, which reduces the gradients into
  each rank's partition (and clips them, `gradient_clipping` = `train.grad_clip`);
- the engine's step checks the global gradient norm and skips a non-finite one: the loop then
  falls back to the last good weights, as it does on one process;
- what herllm reads or writes outside the engine goes through DeepSpeed's fragment API: SI's
  gradient (`safe_get_full_grad`, gathered before the step, only when SI runs), weights written
  by Reptile or by the fall-back (`safe_set_full_fp32_param`: otherwise the engine's fp32
  partition would overwrite them at its next step), Reptile's reset of first moments (each rank
  zeroes its own fragment), and checkpoints: the optimizer state is gathered into the layout of
  `torch.optim.AdamW.state_dict()` over the trainable parameters, so a checkpoint resumes under
  any engine and any number of processes.

Stage 3 partitions the parameters themselves and is refused (`zero_config`); FSDP
(`train.fsdp`) shards the frozen base instead. See docs/scaling.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from herllm.errors import UserError

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_OFF = ("", "0", "false", "no", "off", "none")  # train.deepspeed values that turn it off


def _enabled(block) -> bool:
    return isinstance(block, dict) and str(block.get("enabled", False)).lower() in ("true", "1")


def read_setting(setting: str) -> dict:
    """`train.deepspeed` as a DeepSpeed config: "1" or "2" (a ZeRO stage) or a JSON file."""
    if setting.strip() in ("1", "2", "3"):
        return {"zero_optimization": {"stage": int(setting)}}
    path = Path(setting)
    if not path.is_file():
        raise UserError(
            f"train.deepspeed={setting!r} is neither a ZeRO stage (1 or 2) nor a DeepSpeed "
            "config file; pass --set train.deepspeed=2 or the path of a JSON config"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({e}); fix the file") from e


def requested(distributed_type, setting: str, plugin=None, env=None) -> tuple[dict, str] | None:
    """The DeepSpeed config the user asked for, and where: `accelerate launch --use_deepspeed`
    (on GPUs Accelerate's own plugin; on a CPU machine Accelerate's state says multi-CPU, so the
    launcher's `ACCELERATE_DEEPSPEED_*` variables are read into a plugin here) wins over
    `train.deepspeed`; None when neither asks."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    env = os.environ if env is None else env
    launched = str(env.get("ACCELERATE_USE_DEEPSPEED", "false")).lower() in ("true", "1", "yes")
    if distributed_type == DistributedType.DEEPSPEED or launched:
        plugin = plugin if plugin is not None else DeepSpeedPlugin()  # reads the variables
        return dict(plugin.deepspeed_config), "in the Accelerate DeepSpeed config"
    if setting.strip().lower() not in _OFF:
        return read_setting(setting), f"train.deepspeed={setting}"
    return None


def zero_config(user: dict, where: str, batch_size: int, grad_clip: float) -> dict:
    """The DeepSpeed config herllm runs: the user's, checked (one line for what herllm cannot
    honour), with the batch, clipping and optimizer entries that herllm owns filled in."""
    cfg = json.loads(json.dumps(user, default=str))  # a copy, "auto" and all
    zo = cfg.get("zero_optimization") or {}
    stage = int(zo.get("stage", 0))
    if stage == 3:
        raise UserError(
            f"DeepSpeed ZeRO stage 3 ({where}) is not supported by herllm: it partitions the "
            "parameters themselves, which herllm's importances, anchors, routing and saving read "
            "whole; shard the frozen base with FSDP instead (`--set train.fsdp=true` or "
            "`accelerate launch --use_fsdp`), or use ZeRO stage 1 or 2"
        )
    if stage not in (1, 2):
        raise UserError(
            f"DeepSpeed ZeRO stage {stage} ({where}) is not run by herllm: stage 0 is plain data "
            "parallelism (use DDP: `accelerate launch --multi_gpu` or `torchrun`); use stage 1 or 2"
        )
    for block in ("fp16", "bf16"):
        if _enabled(cfg.get(block)):
            raise UserError(
                f"DeepSpeed {block} ({where}) is not supported by herllm, which trains in fp32; "
                f"set {block}.enabled to false (and launch with --mixed_precision no)"
            )
    for block in ("offload_optimizer", "offload_param"):
        device = str((zo.get(block) or {}).get("device", "none")).lower()
        if device not in ("none", "null"):
            raise UserError(
                f"DeepSpeed {block} to {device} ({where}) is not supported by herllm (the "
                "adapters' optimizer state is small); set its device to none"
            )
    # Accelerate's DeepSpeed configs name an optimizer and scheduler whose values are "auto"
    # ("from the training script"): herllm's AdamW and warm-up are exactly that. Anything else
    # would be overridden by herllm, so it is refused.
    for block, kinds in (("optimizer", ("adam", "adamw")), ("scheduler", ("warmuplr",))):
        section = cfg.pop(block, None) or {}
        fixed = sorted(k for k, v in (section.get("params") or {}).items() if v != "auto")
        kind = str(section.get("type", kinds[0]))
        if section and (fixed or kind.lower() not in kinds):
            what = f"parameters {fixed}" if fixed else f"type {kind}"
            raise UserError(
                f"the DeepSpeed config ({where}) sets the {block} {what}, but herllm builds its "
                f"own (AdamW with train.lr and train.weight_decay, a linear warm-up of "
                f"train.warmup_steps, then constant); set them to auto or remove the "
                f"{block!r} section, and pass herllm's options instead"
            )
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1, "1"):
        raise UserError(
            f"gradient_accumulation_steps={gas} ({where}) is not supported by herllm, which "
            "steps once per batch; set it to 1 or auto and raise --batch-size instead"
        )
    clip = cfg.get("gradient_clipping", "auto")
    cfg["gradient_clipping"] = float(grad_clip if clip in ("auto", None) else clip)
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world
    cfg["zero_allow_untested_optimizer"] = True  # herllm's torch AdamW
    cfg["steps_per_print"] = 2**62  # herllm reports progress itself
    cfg["zero_optimization"] = {k: v for k, v in zo.items() if v != "auto"}
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


class ZeroOptimizer:
    """herllm's AdamW inside a DeepSpeed ZeRO-1/2 engine, with the interface the loop uses of a
    torch optimizer (`step`, `zero_grad`, `param_groups`, `state`, `state_dict`,
    `load_state_dict`), plus what the engine needs from the loop: `backward`, `grads_finite` and
    `discard` (the check of the gradient before the step), `weights_written`, `destroy`.

    `keep_grads`: gather every trainable parameter's whole gradient after the backward and hand
    it back as `p.grad` after the step (SI reads it then); ZeRO-2 otherwise keeps only this
    rank's partition of it. `overflow` tells whether the last step was skipped (a non-finite
    gradient norm).
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, config: dict, keep_grads: bool):
        import deepspeed

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base = optimizer
        self.engine, self.zero, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.keep_grads = keep_grads
        self.overflow = False
        self._grads: list[torch.Tensor | None] | None = None

    # -- the step ---------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        from deepspeed.utils import safe_get_full_grad

        self.engine.backward(loss)
        if self.keep_grads:  # a collective per parameter: every rank gathers the same
            self._grads = [_clone(safe_get_full_grad(p)) for p in self.params]
            clip = self.engine.gradient_clipping()
            if clip > 0:  # as the step will clip them (and as the loop does without DeepSpeed)
                _clip_([g for g in self._grads if g is not None], clip)

    def grads_finite(self) -> bool:
        """Whether every rank's gradient partition is finite (a collective), checked before the
        step as the loop checks the clipped norm without DeepSpeed: a non-finite gradient then
        rolls back to the weights before the last step, as there. (The engine's step checks
        again and would skip the step.)"""
        self.zero.check_overflow(partition_gradients=self.zero.partition_gradients)
        return not self.zero.overflow

    def discard(self) -> None:
        """Drop this step's gradients after `grads_finite` said no: the engine's step sees the
        same overflow, skips the update and clears its gradient partitions and buckets."""
        self.engine.step()
        if not self.zero.overflow:
            raise RuntimeError("DeepSpeed stepped on gradients herllm found non-finite; a bug")
        self.zero_grad()

    def step(self) -> None:
        self.engine.step()
        self.overflow = bool(self.zero.overflow)
        if self._grads is not None and not self.overflow:
            for p, g in zip(self.params, self._grads, strict=True):
                p.grad = g
        self._grads = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.zero_grad(set_to_none=True)
        self._grads = None
        for p in self.params:
            p.grad = None

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self) -> dict:
        """This rank's fragment of each parameter's optimizer state (views into the partition:
        Reptile's reset of first moments zeroes them in place, every rank its own)."""
        out = {}
        for p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None and mapping.optim_fragment:
                out[p] = mapping.optim_fragment
        return out

    @torch.no_grad()
    def weights_written(self) -> None:
        """The module's trainable weights were written outside the engine (Reptile, the
        fall-back to the last good weights): copy them into the engine's fp32 partitions, which
        its next step would otherwise write back. Every rank holds the same weights and updates
        its own fragment, so nothing is communicated."""
        from deepspeed.utils import safe_set_full_fp32_param

        for p in self.params:
            safe_set_full_fp32_param(p, p.detach())

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state gathered whole, laid out as `torch.optim.AdamW.state_dict()` over
        the trainable parameters. A collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_optimizer_state

        group = {k: v for k, v in self.base.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        flat = self._flat_state()
        state = {}
        if flat is not None:
            for i, p in enumerate(self.params):
                state[i] = {"step": flat["step"].clone()} | {
                    k: safe_get_full_optimizer_state(p, k).detach().cpu().clone()
                    for k in _ADAM_KEYS
                }
        return {"state": state, "param_groups": [group]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Load `state_dict()`'s layout (also a plain AdamW's, saved by any engine): each rank
        keeps its fragment of every parameter's moments."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(sd["param_groups"][0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state for {len(sd['param_groups'][0]['params'])} parameters, but "
                f"{len(self.params)} train; the checkpoint does not belong to this model"
            )
        for g in self.base.param_groups:
            g.update({k: v for k, v in sd["param_groups"][0].items() if k != "params"})
        if not sd["state"]:
            return
        step = sd["state"][0]["step"]
        for flat in self.zero.single_partition_of_fp32_groups:  # Adam's state, created ahead
            self.base.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone()}
            self.base.state[flat].update({k: torch.zeros_like(flat) for k in _ADAM_KEYS})
        self.zero._hp_optimizer_states_linked = False
        self.zero._lazy_init_hp_params_optimizer_state()  # fragments now view that state
        for i, p in enumerate(self.params):
            for k in _ADAM_KEYS:
                safe_set_full_optimizer_state(p, sd["state"][i][k].to(p.device), k)

    def partition(self) -> dict:
        """The ZeRO stage, the trainable parameters in all, and how many of them this rank's
        fp32 master partition (and with it the Adam moments) holds."""
        flats = self.zero.single_partition_of_fp32_groups
        return {"stage": int(self.engine.zero_optimization_stage()),
                "trainable_params": sum(p.numel() for p in self.params),
                "local_params": sum(f.numel() for f in flats)}  # fmt: skip

    def _flat_state(self) -> dict | None:
        flats = self.zero.single_partition_of_fp32_groups
        return self.base.state.get(flats[0]) if flats else None

    def destroy(self) -> None:
        """Remove the engine's gradient hooks (before a new engine takes over what trains)."""
        self.engine.destroy()


@torch.no_grad()
def _clip_(grads: list[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_`'s scaling, applied to gradient tensors themselves."""
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()
