"""Experience refinement, part 1: per-experience uncertainty in batched no-grad passes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    FSDPModule = ()


@dataclass
class Scores:
    nll: torch.Tensor
    """(B,) mean token negative log-likelihood over the loss-masked tokens (nats)."""
    entropy: torch.Tensor
    """(B,) mean predictive entropy over the same positions (nats)."""
    reps: torch.Tensor
    """(B, H) hidden states mean-pooled over real tokens (the last layer's, the base model's or
    the input embeddings, as `shift.reps` says): the representation statistic."""
    tokens: int
    """Tokens scored (attention-mask sum)."""
    base: bool = False
    """`reps` are the frozen base model's (adapters off): valid as routing-key inputs."""

    def __len__(self) -> int:
        return len(self.nll)

    def cat(self, other: Scores) -> Scores:
        """These rows, then `other`'s (both scored with the same settings)."""
        reps = [r for r, n in ((self.reps, len(self)), (other.reps, len(other))) if n]
        return Scores(
            nll=torch.cat([self.nll, other.nll]),
            entropy=torch.cat([self.entropy, other.entropy]),
            reps=torch.cat(reps) if reps and all(r is not None for r in reps) else None,
            tokens=self.tokens + other.tokens,
            base=self.base,
        )


CHUNK_ELEMENTS = 1 << 26
"""Largest (rows, T, V) block of temporaries `token_stats` makes at once (256 MB in fp32): with a
49,152-token vocabulary a scoring batch of 16 x 128 would otherwise hold two 400 MB copies."""


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean NLL and entropy of next-token predictions, and the count of counted tokens.

    logits (B, T, V) predict labels shifted by one; labels (B, T) with -100 where no loss. Rows
    are taken in blocks of at most `CHUNK_ELEMENTS` logits (each row's result is the same).
    Without `entropy` the entropy is NaN and its two vocabulary-wide passes (softmax, product)
    are skipped; the NLL is the same, bit for bit.
    """
    b, t, v = logits.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, t * v))
    if b <= rows:
        return _token_stats(logits, labels, entropy)
    parts = [_token_stats(logits[i : i + rows], labels[i : i + rows], entropy)
             for i in range(0, b, rows)]  # fmt: skip
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]


def _token_stats(logits: torch.Tensor, labels: torch.Tensor, entropy: bool = True):
    logits = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    valid = target != -100  # (B, T-1)
    # Two (B, T-1, V) temporaries instead of three: H = logZ - sum p * logit, NLL = logZ - logit_y.
    lse = torch.logsumexp(logits, dim=-1)  # (B, T-1)
    nll = lse - logits.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    count = valid.sum(-1)  # (B,)
    denom = count.clamp_min(1)
    nll_mean = (nll * valid).sum(-1) / denom  # (B,)
    if not entropy:
        return nll_mean, torch.full_like(nll_mean, math.nan), count
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # (B, T-1)
    return nll_mean, (ent * valid).sum(-1) / denom, count


@torch.no_grad()
def sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean token NLL per sample; cheaper than token_stats (no entropy, no full log-softmax copy)."""
    b, t, v = logits.shape
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(b, t - 1)  # (B, T-1), 0 where ignored
    count = (labels[:, 1:] != -100).sum(-1).clamp_min(1)  # (B,)
    return nll.sum(-1) / count


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states -> (B, H) float mean over real tokens."""
    mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.inference_mode()
def base_pooled_states(model, batch: dict) -> torch.Tensor:
    """(B, H) mean-pooled last hidden states of the base model, adapters off, on the CPU.

    The decoder stack alone runs when the architecture exposes it (`get_decoder`): no output
    layer over the vocabulary, which is a large share of a small model's forward pass."""
    peft = getattr(model, "module", model)  # the PeftModel inside an Accelerate/DDP wrapper
    was_training = peft.training
    peft.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Leaving `disable_adapter` re-activates the active adapters and makes them all trainable
    # (PEFT); frozen adapters must stay frozen.
    trainable = [p.requires_grad for p in peft.parameters()]
    with peft.disable_adapter():
        base = peft.get_base_model()
        get = getattr(base, "get_decoder", None)
        decoder = get() if callable(get) else None
        hidden = None
        if decoder is not None and decoder is not base:
            # FSDP2: the model's own weights (embeddings, final norm) are gathered by its
            # forward, which the decoder alone bypasses: gather them around the call
            fsdp = isinstance(peft, FSDPModule)
            if fsdp:
                peft.unshard()
            try:
                out = decoder(input_ids=ids, attention_mask=mask)
            finally:
                if fsdp:
                    peft.reshard()
            hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = peft(
                input_ids=ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states[-1]
    for p, flag in zip(peft.parameters(), trainable, strict=True):
        p.requires_grad_(flag)
    if was_training:
        peft.train()
    return _pool(hidden, mask).cpu()


def _pooled(out, batch: dict, reps: str, n: int | None = None) -> torch.Tensor:
    """(n, H) pooled states of a forward run with `output_hidden_states`: the last layer's
    (`model`) or the input embeddings (`embed`: hidden_states[0], below every adapted layer)."""
    layer = 0 if reps == "embed" else -1
    hidden = out.hidden_states[layer].detach()[:n]
    return _pool(hidden, batch["attention_mask"][:n]).cpu()


@torch.inference_mode()
def score_batch(model, batch: dict, reps: str = "model", entropy: bool = True) -> Scores:
    """One no-grad forward pass: NLL, entropy and pooled representation of every sample.

    `reps`: the last hidden state (`model`), the base model's (`base`: adapters off, one more
    pass through the decoder: what the inputs look like, whatever the adapters have learned) or
    the input embeddings (`embed`: no adapter changes them, and they cost nothing). Without
    ``entropy`` (nobody reads it: only shift detection does) the entropy is NaN."""
    was_training = model.training
    model.eval()
    base = reps == "base"
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=not base,
    )
    if was_training:
        model.train()
    nll, ent, _ = token_stats(out.logits, batch["labels"], entropy)
    pooled = base_pooled_states(model, batch) if base else _pooled(out, batch, reps)
    tokens = int(batch["attention_mask"].sum())
    return Scores(nll=nll.cpu(), entropy=ent.cpu(), reps=pooled, tokens=tokens, base=base)


@torch.no_grad()
def step_scores(model, out, batch: dict, n: int, reps: str = "model",
                entropy: bool = True) -> Scores:  # fmt: skip
    """Scores of a training batch's first `n` rows from that step's own forward `out` (run with
    `output_hidden_states` unless `reps` is `base`): the weights before the update, as a
    scoring pass just before the step would have seen them. `base` runs the base-model pass on
    those rows. No tokens are counted as scored: no extra forward over the vocabulary ran."""
    rows = {k: v[:n] for k, v in batch.items()}
    nll, ent, _ = token_stats(out.logits.detach()[:n], rows["labels"], entropy)
    base = reps == "base"
    pooled = base_pooled_states(model, rows) if base else _pooled(out, rows, reps, n)
    return Scores(nll=nll.cpu(), entropy=ent.cpu(), reps=pooled, tokens=0, base=base)


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed token NLL of one batch and its token count: the terms `mean_nll` adds up."""
    nll, _, n = token_stats(logits, labels, entropy=False)
    return float((nll * n).sum()), int(n.sum())


@torch.no_grad()
def mean_nll(model, batches, known: dict | None = None) -> tuple[float, int]:
    """Token-weighted mean NLL over batches (for held-out evaluation) and the token count.

    `known`: {batch index: `batch_nll`} of batches this model already ran forward on with the
    same weights (see `run.units.nll_tap`); they are not run again."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device  # the evaluation sets live on the CPU
    for i, batch in enumerate(batches):
        if known is not None and i in known:
            t, n = known[i]
        else:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = model(input_ids=ids, attention_mask=mask)
            t, n = batch_nll(out.logits, batch["labels"].to(device))
        total += t
        count += n
    if was_training:
        model.train()
    return (total / count if count else float("nan")), count
