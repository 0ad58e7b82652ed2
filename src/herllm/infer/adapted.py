"""Query a run: the base model plus the run's adapters, routed per input (no task id).

    from herllm.infer.adapted import AdaptedModel
    m = AdaptedModel.from_run("runs/my-run")
    m.generate("def parse(", max_new_tokens=40)       # routed to the unit the prompt belongs to
    m.generate("Call me", adapter="a001")             # one adapter forced (or "base")
    m.routes(["some text", "more text"])              # which adapter each input would use

    m.chat([{"role": "user", "content": "Who wrote it?"}])   # through the chat template
    m.generate("Where was Ada born?", user="alice")   # with passages from the run's store
    m.last_retrieval                                  # the passages each prompt was given

`herllm generate --run RUN "prompt"` is the same from the command line (`--chat`, `--user`,
`--k`, `--no-knowledge`).

Knowledge: when the run has a store (RUN_DIR/knowledge.sqlite, see `herllm.infer.knowledge`
for the scopes searched), the best passages for each prompt go in front of it
(`herllm.memory.knowledge.build_prompt`): as a plain `Known facts:` preamble for `generate`
(text continuation) and in the system message for `chat`. Routing still picks the adapter
from the user's own input (the prompt, or the conversation as the chat template renders it),
never from the retrieved passages: the passages may come from another unit's documents and
would pull the route towards their domain rather than the question's, and a route that does
not depend on retrieval keeps answers with and without `--no-knowledge` comparable.
"""

from __future__ import annotations

from pathlib import Path

import torch

from herllm import atomic as ckpt
from herllm.config import build_config
from herllm.errors import UserError
from herllm.infer.knowledge import RunKnowledge
from herllm.memory.knowledge.prompt import build_prompt
from herllm.memory.knowledge.records import Hit
from herllm.models.chat import apply_chat, check_messages, has_chat_template
from herllm.models.load import ADAPTER_NAME, attach_lora, load_base
from herllm.run.adapters_io import load_adapters
from herllm.update import adapters as ad


class AdaptedModel:
    """A run's model as users query it (see module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        bank: ad.AdapterBank | None,
        open_key=None,
        knowledge: RunKnowledge | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bank = bank
        self.open_key = open_key
        self.knowledge = knowledge
        """The run's knowledge store (None: the run has none, or it was turned off)."""
        self.last_retrieval: list[list[Hit]] = []
        """The passages put in front of each prompt of the last `generate` / `chat` call, best
        first (one list per prompt; empty lists without a store)."""

    @classmethod
    def from_run(
        cls, run_dir: str | Path, step: int | None = None, knowledge: bool = True
    ) -> AdaptedModel:
        """Load the newest checkpoint of `run_dir` (or the one at `step`); `knowledge=False`
        leaves the run's knowledge store closed (answers without retrieval)."""
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
                                           cfg.stream.seq_len, pad, device,
                                           current.get("reservoir_reps"))  # fmt: skip
        store = RunKnowledge.open(run, cfg.knowledge) if knowledge else None
        return cls(model, tokenizer, bank, open_key, store)

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

    def _encode(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        self.tokenizer.padding_side = "left"  # generation continues every prompt at its end
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        )
        return {
            k: v.to(self.model.device)
            for k, v in enc.items()
            if k in ("input_ids", "attention_mask")
        }

    def routes(self, texts: list[str], chat: bool = False) -> list[str]:
        """The adapter each text would use (`base` only for a text far from every unit under
        `expand.fallback=base`); `chat`: each text as a user message, routed as `chat` routes it."""
        if self.bank is None:
            return [ADAPTER_NAME] * len(texts)
        if chat:
            texts = [apply_chat(self.tokenizer, [{"role": "user", "content": t}]) for t in texts]
        enc = self._encode(texts, add_special_tokens=not chat)
        names = self.routed().routes(enc["input_ids"], enc["attention_mask"])
        return ["base" if n == ad.BASE else n for n in names]

    # -- answers ----------------------------------------------------------------------------
    def retrieve(self, query: str, user: str | None = None, k: int | None = None) -> list[Hit]:
        """The store's passages for `query` (none without a store); see `infer.knowledge`."""
        if self.knowledge is None:
            return []
        return self.knowledge.search(query, user=user, k=k)

    @torch.no_grad()
    def generate(
        self,
        prompts: str | list[str],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        *,
        user: str | None = None,
        k: int | None = None,
    ) -> str | list[str]:
        """Continue each prompt (with the store's passages in front of it, module doc); greedy
        unless `temperature` > 0. `user` picks whose passages, `k` how many at most."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        inputs = []
        for text in texts:
            hits = self.retrieve(text, user, k)
            budget = self.knowledge.budget if self.knowledge else None
            inputs.append(build_prompt(hits, text, self.tokenizer, budget=budget, chat=False))
        self.last_retrieval = [mi.used for mi in inputs]
        model_texts = [mi.text for mi in inputs]
        route = None if model_texts == texts else self._encode(texts)  # route on the prompts
        enc = self._encode(model_texts)
        decoded = self._continue(enc, route, adapter, max_new_tokens, temperature, seed)
        return decoded[0] if single else decoded

    @torch.no_grad()
    def chat(
        self,
        messages: list[dict],
        adapter: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        *,
        user: str | None = None,
        k: int | None = None,
    ) -> str:
        """The assistant's reply to a conversation (OpenAI chat messages), rendered by the
        model's chat template with the generation prompt; passages for the last user message
        go in the system message. Only the reply is returned."""
        if not has_chat_template(self.tokenizer):
            name = Path(str(getattr(self.tokenizer, "name_or_path", "") or "?")).name
            raise UserError(
                f"the run's model {name} has no chat template, so it cannot answer chat "
                "messages; adapt a run with --model smollm2-135m (or generate without --chat)"
            )
        messages = check_messages(messages, "chat messages")
        users = [m["content"] for m in messages if m["role"] == "user"]
        hits = self.retrieve(users[-1], user, k) if users else []
        budget = self.knowledge.budget if self.knowledge else None
        mi = build_prompt(hits, messages, self.tokenizer, budget=budget, chat=True)
        self.last_retrieval = [mi.used]
        # the template wrote the special tokens; routing reads the conversation without passages
        enc = self._encode([mi.text], add_special_tokens=False)
        route = self._encode([apply_chat(self.tokenizer, messages)], add_special_tokens=False)
        out = self._continue(enc, route, adapter, max_new_tokens, temperature, seed)
        return out[0].strip()

    def _continue(self, enc, route, adapter, max_new_tokens, temperature, seed) -> list[str]:
        """The decoded new tokens of each row of `enc`; `route` (encoded) picks each row's
        adapter instead of `enc` itself when given."""
        torch.manual_seed(seed)
        kw = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
              "pad_token_id": self.tokenizer.pad_token_id}  # fmt: skip
        if temperature > 0:
            kw["temperature"] = temperature
        model = self.routed(adapter)
        if route is not None and isinstance(model, ad.RoutedModel) and adapter is None:
            if self.bank.compose == "route":
                kw["adapter_names"] = model.routes(route["input_ids"], route["attention_mask"])
            model = self.model
        out = model.generate(**enc, **kw)
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


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
