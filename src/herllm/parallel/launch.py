"""Launch checks: how many processes the launcher started, and which engine the launch asks
for (FSDP through `train.fsdp` or `accelerate launch --use_fsdp`, DeepSpeed ZeRO through
`train.deepspeed` or `--use_deepspeed`), with the combinations herllm cannot run refused in one
line."""

from __future__ import annotations

import os
from dataclasses import dataclass

from herllm.errors import UserError
from herllm.parallel import zero

# (the variables Accelerate itself reads).
LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes(env: dict | None = None) -> tuple[str | None, int]:
    """The launcher's variable that holds the number of processes, and that number (1 when no
    launcher set one)."""
    env = os.environ if env is None else env
    var = next((v for v in LAUNCHER_WORLD_VARS if env.get(v)), None)
    return var, int(env[var]) if var else 1


def check_world_size(num_processes: int, env: dict | None = None) -> None:
    """Refuse a run whose launcher started more processes than Accelerate joined.

    On a CPU machine, `torchrun --nproc_per_node 2` with an Accelerator that is not told
    `cpu=True` gives every process a world of one: each trains alone, without any error.
    """
    var, launched = launched_processes(env)
    if launched != num_processes:
        raise UserError(
            f"the launcher started {launched} processes ({var}={launched}) but Accelerate "
            f"joined {num_processes}, so each rank would train alone; on a CPU-only machine "
            "Accelerate must be built with cpu=True (herllm does when CUDA is absent), so check "
            "the ACCELERATE_* and CUDA_VISIBLE_DEVICES variables, or launch with "
            f"`torchrun --nproc_per_node {launched} -m herllm.cli adapt ...`"
        )


def _env_flag(env, name: str) -> bool:
    return str(env.get(name, "false")).lower() in ("true", "1", "yes")


def fsdp_reshard(plugin, default: bool) -> bool:
    """`reshard_after_forward` for herllm's FSDP2 sharding, read from Accelerate's FSDP plugin
    (`accelerate launch --use_fsdp ...`); the options herllm cannot honour are refused."""
    if plugin is None:
        return default
    where = "in the Accelerate FSDP config"
    offload = plugin.cpu_offload  # FSDP1: CPUOffload(offload_params=...); FSDP2: a policy
    if (
        offload is True
        or getattr(offload, "offload_params", False)
        or (type(offload).__name__ == "CPUOffloadPolicy")
    ):
        raise UserError(f"FSDP CPU offload ({where}) is not supported by herllm; turn it off")
    if plugin.mixed_precision_policy is not None:
        raise UserError(
            f"FSDP mixed precision ({where}) is not supported by herllm, which trains in fp32; "
            "launch with --mixed_precision no"
        )
    if plugin.activation_checkpointing or plugin.ignored_modules:
        raise UserError(
            f"FSDP activation checkpointing and ignored modules ({where}) are not supported by "
            "herllm, which chooses what to shard itself (the LoRA adapters stay whole); turn them off"
        )
    reshard = plugin.reshard_after_forward
    if isinstance(reshard, bool):  # FSDP2
        return reshard
    strategy = reshard if reshard is not None else getattr(plugin, "sharding_strategy", None)
    if strategy is None:
        return default
    name = getattr(strategy, "name", str(strategy))  # FSDP1's sharding strategy
    if name in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return name == "FULL_SHARD"
    raise UserError(
        f"FSDP sharding strategy {name} ({where}) is not supported by herllm; use FULL_SHARD "
        "or SHARD_GRAD_OP, or plain DDP (`accelerate launch --multi_gpu`) for no sharding"
    )


@dataclass
class Launch:
    """What the launch asked for."""

    sharded: bool
    """The frozen base weights are sharded with FSDP2 (`parallel.fsdp`): every forward pass is
    then a collective, which all ranks must run together."""
    reshard: bool
    """FSDP's `reshard_after_forward`."""
    zero: dict | None
    """The DeepSpeed ZeRO-1/2 config the adapters' optimizer runs under (`parallel.zero`)."""


def read_launch(accelerator, train) -> Launch:
    """The engine `train` (the run's `TrainConfig`) and the launcher ask for; refuses a
    launcher/Accelerate world-size mismatch and the combinations herllm cannot run."""
    from accelerate.utils import DistributedType

    check_world_size(accelerator.num_processes)
    world = accelerator.num_processes
    # `accelerate launch --use_fsdp`: on GPUs Accelerate's state says FSDP; on a CPU machine
    # it says multi-CPU and only the launcher's variables tell (read them into a plugin)
    plugin = None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif _env_flag(os.environ, "ACCELERATE_USE_FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables
    sharded = world > 1 and (train.fsdp or plugin is not None)
    reshard = fsdp_reshard(plugin, train.fsdp_reshard_after_forward) if sharded else True
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    asked = zero.requested(accelerator.distributed_type, train.deepspeed, ds_plugin)
    config = None
    if asked is not None and world > 1:
        if sharded:
            raise UserError(
                "both FSDP and DeepSpeed are asked for (train.fsdp / --use_fsdp and "
                "train.deepspeed / --use_deepspeed); choose one"
            )
        config = zero.zero_config(*asked, train.batch_size, train.grad_clip)
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise UserError(
                f"DeepSpeed is asked for ({asked[1]}) but is not installed ({e}); install it "
                "after torch with `pip install 'herllm[deepspeed]'`, or launch without it"
            ) from e
    engine = "FSDP" if sharded else "DeepSpeed" if config else None
    if engine and accelerator.mixed_precision != "no":
        raise UserError(
            f"mixed precision {accelerator.mixed_precision} is not supported with {engine} in "
            "herllm, which trains in fp32 (its model is not prepared by Accelerate, so the "
            "loss would be scaled and never unscaled); launch with --mixed_precision no"
        )
    return Launch(sharded, reshard, config)
