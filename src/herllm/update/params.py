"""The trainable parameters the protection methods read, and helpers shared by them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Batch = Mapping[str, Tensor]


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the loop trains (``requires_grad=True``), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters (same device and dtype)."""
    return {n: p.detach().clone() for n, p in trainable_params(model).items()}


def _zero(model: nn.Module) -> Tensor:
    params = trainable_params(model)
    if not params:
        raise ValueError(
            "model has no trainable parameters; attach LoRA adapters (herllm.models.load) first"
        )
    return torch.zeros((), device=next(iter(params.values())).device)


def _clone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def _check_kind(obj: object, state: dict) -> None:
    kind = type(obj).__name__
    if state.get("kind") != kind:
        raise ValueError(
            f"{kind}.load_state_dict got state of kind {state.get('kind')!r}; "
            f"load the state saved by a {kind}"
        )


def _acc_dtype(p: Tensor) -> torch.dtype:
    """Accumulate in at least fp32: bf16/fp16 sums of many small terms lose them."""
    return torch.promote_types(p.dtype, torch.float32)


def _model_inputs(sample: Batch, device: torch.device) -> dict[str, Tensor]:
    """The keys a HF causal LM forward accepts, moved to the model's device."""
    ids = sample["input_ids"].to(device)
    mask = sample.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return {"input_ids": ids, "attention_mask": mask}


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(trainable_params(model).values())).device
