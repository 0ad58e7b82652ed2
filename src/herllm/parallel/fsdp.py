"""FSDP2 over the frozen base (`train.fsdp`, or `accelerate launch --use_fsdp`): herllm shards
each decoder layer itself and leaves the LoRA adapters whole on every rank, averaging their
gradients by hand (`sync_grads`)."""

from __future__ import annotations

import torch


def shard_model(model: torch.nn.Module, device, reshard: bool) -> dict:
    """Shard the frozen base weights of a PEFT model with FSDP2: each decoder layer (the
    classes the model lists in `_no_split_modules`) and then the whole model. The LoRA
    parameters, and those of adapters grown later, stay whole on every rank: they are small,
    and importances, anchors, Reptile and saving read them as plain tensors. Returns the
    number of base parameters and how many this rank holds."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    lora = {p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():  # FSDP moves what it shards to the device, unit by unit; the
        for p in lora:  # adapters, which it leaves alone, are moved here
            p.data = p.data.to(device)
    kinds = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    for module in [m for m in model.modules() if type(m).__name__ in kinds]:
        fully_shard(module, reshard_after_forward=reshard, ignored_params=lora)
    fully_shard(model, reshard_after_forward=reshard, ignored_params=lora)
    with torch.no_grad():  # FSDP initialises from the first forward, which must be the root's
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    return {"base_params": sum(p.numel() for p in sharded),
            "local_params": sum(p.to_local().numel() for p in sharded)}  # fmt: skip


def settle(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP unit, on every rank, before rank 0 alone
    reads the model's state dict (saving the adapters): FSDP's state-dict hook reshards what
    is still gathered (`reshard_after_forward=false`), and done on one rank only that would
    leave the ranks' next forward passes out of step."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the adapter gradients over ranks (with a sharded base, FSDP leaves the LoRA
    parameters alone; under DDP this is done by DDP itself)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()
