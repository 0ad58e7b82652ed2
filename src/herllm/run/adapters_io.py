"""The adapters on disk: one PEFT folder per adapter (`adapters/<name>/`), loadable with plain
`peft.PeftModel.from_pretrained`, and the routing keys beside them (`adapters/routing.json`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from herllm.errors import UserError
from herllm.models.load import ADAPTER_NAME


def save_adapters(s, root: Path) -> None:
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
