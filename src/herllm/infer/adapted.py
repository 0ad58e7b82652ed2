"""Query a run: the base model plus the run's adapters, routed per input (no task id).

    from herllm.infer.adapted import AdaptedModel
    m = AdaptedModel.from_run("runs/my-run")
    m.generate("def parse(", max_new_tokens=40)       # routed to the unit the prompt belongs to
    m.generate("Call me", adapter="a001")             # one adapter forced (or "base")
    m.routes(["some text", "more text"])              # which adapter each input would use

`herllm generate --run RUN "prompt"` is the same from the command line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from herllm import atomic as ckpt
from herllm.config import build_config
from herllm.errors import UserError
from herllm.models.load import ADAPTER_NAME, attach_lora, load_base
from herllm.run.adapters_io import load_adapters
from herllm.update import adapters as ad


class AdaptedModel:
    """A run's model as users query it (see module doc)."""

    def __init__(self, model, tokenizer, bank: ad.AdapterBank | None, open_key=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bank = bank
        self.open_key = open_key

    @classmethod
    def from_run(cls, run_dir: str | Path, step: int | None = None) -> AdaptedModel:
        """Load the newest checkpoint of `run_dir` (or the one at `step`)."""
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise UserError(
                f"{run} is not a run directory (no config.yaml); pass a --run-dir of herllm adapt"
            )
        ckpts = dict(ckpt.list_checkpoints(run / "checkpoints"))
        if not ckpts:
            raise UserError(
                f"{run} has no checkpoint yet; let herllm adapt run until its first one"
            )
        if step is not None and step not in ckpts:
            raise UserError(f"{run} has no checkpoint at step {step}; it has {sorted(ckpts)}")
        path = ckpts[step if step is not None else max(ckpts)]
        cfg = build_config(str(run / "config.yaml"), [])
        base, tokenizer = load_base(cfg.model)
        model = attach_lora(base, cfg.lora)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        state = torch.load(path / "trainer.pt", weights_only=False, map_location="cpu")
        bank = ad.AdapterBank.from_state(state["bank"]) if state.get("bank") else None
        load_adapters(model, path / "adapters", bank)
        open_key = None
        current = (state.get("ledger") or {}).get("current")
        if bank is not None:
            ad.activate(model, bank)
            if current is not None and bank.compose == "route":
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                open_key = ad.fit_unit_key(model, current["reservoir"], current["id"], bank.current,
                                        cfg.stream.seq_len, pad, device)  # fmt: skip
        return cls(model, tokenizer, bank, open_key)

    # -- routing -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank is not None else [ADAPTER_NAME]

    def _resolve(self, adapter: str | None) -> str | None:
        """An adapter name, a unit id (-> its adapter) or `base`; None routes."""
        if adapter is None:
            return None
        if adapter == "base":
            return ad.BASE
        if adapter in self.adapter_names():
            return adapter
        if self.bank is not None:
            for name, info in self.bank.adapters.items():
                if adapter in info["units"]:
                    return name
        raise UserError(
            f"unknown adapter {adapter!r}; choose one of {', '.join(self.adapter_names())}, a unit "
            "id from `herllm ledger`, or base"
        )

    def routed(self, adapter: str | None = None):
        """The callable model (routed, or pinned to `adapter`)."""
        force = self._resolve(adapter)
        if self.bank is None:
            if force == ad.BASE:
                return _BaseOnly(self.model)
            return self.model
        extra = [self.open_key] if self.open_key is not None else []
        return ad.RoutedModel(self.model, self.bank, extra, force=force)

    def _encode(self, texts: list[str]) -> dict:
        self.tokenizer.padding_side = "left"  # generation continues every prompt at its end
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {
            k: v.to(self.model.device)
            for k, v in enc.items()
            if k in ("input_ids", "attention_mask")
        }

    def routes(self, texts: list[str]) -> list[str]:
        """The adapter each text would use (`base` when it is far from every unit)."""
        if self.bank is None:
            return [ADAPTER_NAME] * len(texts)
        enc = self._encode(texts)
        names = self.routed().routes(enc["input_ids"], enc["attention_mask"])
        return ["base" if n == ad.BASE else n for n in names]

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> str | list[str]:
        """Continue each prompt; greedy unless `temperature` > 0."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        enc = self._encode(texts)
        torch.manual_seed(seed)
        kw = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
              "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip
        if temperature > 0:
            kw["temperature"] = temperature
        out = self.routed(adapter).generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return decoded[0] if single else decoded


class _BaseOnly:
    """A plain PEFT model with its adapter switched off for every call."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kw):
        with self._model.disable_adapter():
            return self._model(**kw)

    def generate(self, **kw):
        with self._model.disable_adapter():
            return self._model.generate(**kw)


__all__ = ["AdaptedModel"]
