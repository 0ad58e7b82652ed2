"""Per-sample gradient statistics: the importances of EWC (Fisher) and MAS.

``_per_sample_grad_mean`` averages ``stat(d objective / d theta)`` over samples: from one batched
forward and backward pass when every trainable parameter is a LoRA Linear weight, else with one
backward pass per sample. ``_lm_loss`` and ``_logit_sq_norm`` are the two objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from herllm.update.params import Batch, _acc_dtype, _device_of, _model_inputs, trainable_params

_SAMPLE_KEYS = ("input_ids", "attention_mask", "labels")


def _per_sample_grad_mean(
    model: nn.Module,
    batches: Iterable[Batch],
    objective: Callable[[nn.Module, Batch], Tensor | None],
    stat: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """Mean over samples of ``stat(d objective / d theta)``.

    Per-sample gradients are what the diagonal Fisher and MAS define; squaring a batch gradient
    would cancel the per-sample noise that the Fisher is meant to measure. When every trainable
    parameter is a LoRA Linear weight, one forward and backward pass per batch gives them all
    (`_lora_per_sample_grads`); otherwise one backward pass per sample.
    """
    pairs = _lora_pairs(model)
    if pairs is not None:
        return _lora_per_sample_grad_mean(model, batches, objective, stat, pairs)
    return _looped_per_sample_grad_mean(model, batches, objective, stat)


def _sample_mean(acc: dict[str, Tensor], count: int, params: dict[str, nn.Parameter]) -> dict:
    """The accumulated per-sample statistics divided by the sample count, in each parameter's
    dtype; no sample with a loss is the caller's mistake."""
    if count == 0:
        raise ValueError(
            "consolidate got no sample with a loss (empty batches or all labels -100); "
            "pass a few replay batches with labels"
        )
    return {n: (a / count).to(params[n].dtype) for n, a in acc.items()}


def _lora_pairs(model: nn.Module) -> list[tuple[str, str, nn.Module, nn.Module]] | None:
    """(A weight name, B weight name, A module, B module) of every trainable LoRA Linear pair,
    or None when some trainable parameter is not such a weight (a bias, DoRA's magnitude, a
    LoRA embedding): those need the per-sample loop."""
    pairs, covered = [], set()
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for key, a in lora_a.items():
            b = lora_b[key] if key in lora_b else None
            linear = isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
            if not (linear and a.bias is None and b.bias is None):
                continue
            if a.weight.requires_grad and b.weight.requires_grad:
                names = (f"{name}.lora_A.{key}.weight", f"{name}.lora_B.{key}.weight")
                pairs.append((*names, a, b))
                covered.update(names)
    return pairs if pairs and covered == set(trainable_params(model)) else None


def _lora_per_sample_grad_mean(model, batches, objective, stat, pairs) -> dict[str, Tensor]:
    """Per-sample gradients of LoRA weights from one batched pass (see `_per_sample_grad_mean`).

    For ``v = B u``, ``u = A x`` at every position t of sample i, the sample's gradients are
    ``dB_i = sum_t g_v[i,t] u[i,t]^T`` and ``dA_i = sum_t g_u[i,t] x[i,t]^T`` with ``g = d obj_i
    / d (.)``; samples do not interact in a causal LM, so the gradient of the batch's sum of
    per-sample objectives taken at u and v separates them exactly.
    """
    params = trainable_params(model)
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    seen: dict[str, list] = {}  # A weight name -> [(x, u, v)] per call in this forward

    def hook_a(key):
        def fn(_m, inputs, out):
            seen.setdefault(key, []).append([inputs[0].detach(), out])

        return fn

    def hook_b(key):
        def fn(_m, _inputs, out):
            seen[key][-1].append(out)

        return fn

    handles = [h for a_name, _, a, b in pairs
               for h in (a.register_forward_hook(hook_a(a_name)), b.register_forward_hook(hook_b(a_name)))]  # fmt: skip
    by_name = {a_name: b_name for a_name, b_name, _, _ in pairs}
    count = 0
    was_training = model.training
    model.eval()  # importance of the deterministic function, without adapter dropout noise
    try:
        for batch in batches:
            seen.clear()
            values = objective(model, {k: batch[k] for k in _SAMPLE_KEYS if k in batch}, True)
            valid = torch.isfinite(values)  # samples with nothing to score are NaN
            if not bool(valid.any()):
                continue
            calls = [(name, c) for name in seen for c in seen[name]]
            outs = [t for _, c in calls for t in (c[1], c[2])]
            grads = torch.autograd.grad(values[valid].sum(), outs, allow_unused=True)
            for k, (a_name, (x, u, _v)) in enumerate(calls):
                g_u, g_v = grads[2 * k], grads[2 * k + 1]
                if g_u is None or g_v is None:
                    continue
                b_name = by_name[a_name]
                # (B, T, .) per position -> (B, out, in) per sample: sum over positions
                g_b = torch.einsum("b...o,b...r->bor", g_v[valid], u.detach()[valid])
                g_a = torch.einsum("b...r,b...i->bri", g_u[valid], x[valid])
                acc[b_name] += stat(g_b.to(acc[b_name].dtype)).sum(0)
                acc[a_name] += stat(g_a.to(acc[a_name].dtype)).sum(0)
            count += int(valid.sum())
    finally:
        for h in handles:
            h.remove()
        seen.clear()
        model.train(was_training)
    return _sample_mean(acc, count, params)


def _looped_per_sample_grad_mean(model, batches, objective, stat) -> dict[str, Tensor]:
    """`_per_sample_grad_mean` with one backward pass per sample (any trainable parameter)."""
    params = trainable_params(model)
    names = list(params)
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()  # importance of the deterministic function, without adapter dropout noise
    try:
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                sample = {k: batch[k][i : i + 1] for k in _SAMPLE_KEYS if k in batch}
                value = objective(model, sample)
                if value is None:
                    continue
                grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        acc[n] += stat(g.to(acc[n].dtype))
                count += 1
    finally:
        model.train(was_training)
    return _sample_mean(acc, count, params)


def _lm_loss(model: nn.Module, sample: Batch, per_sample: bool = False) -> Tensor | None:
    """Mean next-token NLL of one sample, or None when it has no labelled token. With
    ``per_sample``: (B,) for a batch, NaN for a sample with no labelled token."""
    device = _device_of(model)
    labels = sample["labels"].to(device)
    if not per_sample:
        if not bool((labels[..., 1:] != -100).any()):
            return None
        return model(**_model_inputs(sample, device), labels=labels).loss
    logits = model(**_model_inputs(sample, device)).logits.float()  # (B, T, V)
    target = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                          reduction="none")  # fmt: skip  # (B, T-1), 0 where ignored
    n = (target != -100).sum(-1)  # (B,)
    return torch.where(n > 0, nll.sum(-1) / n.clamp_min(1), torch.nan)


def _logit_sq_norm(model: nn.Module, sample: Batch, per_sample: bool = False) -> Tensor:
    """Mean over real tokens of ||logits||^2: MAS's label-free output sensitivity ((B,) with
    ``per_sample``)."""
    inputs = _model_inputs(sample, _device_of(model))
    logits = model(**inputs).logits.float()  # (B, T, V)
    mask = inputs["attention_mask"].float()  # (B, T)
    per = (logits.pow(2).sum(-1) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)  # (B,)
    return per if per_sample else per.sum()
