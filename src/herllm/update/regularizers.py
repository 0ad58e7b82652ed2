"""Forgetting protection: penalties that keep the adapter where earlier knowledge needs it.

Each regularizer is a small object the loop calls explicitly (see ``Regularizer``)::

    loss = lm_loss + sum(w * r.penalty(model, batch=anchor_batch) for r, w in ...)
    loss.backward()
    for r in regs: r.after_backward(model)     # gradients are available
    optimizer.step()
    for r in regs: r.after_step(model)         # gradients must still be present (SI reads them)
    ...
    on a detected shift: for r in regs: r.consolidate(model, replay_batches)

"Parameters" are those with ``requires_grad=True`` (the LoRA weights of a ``peft.PeftModel``).
Importances and anchors live on the parameters' device and dtype. A parameter that stops being
trainable (a frozen adapter) cannot drift, so it is not penalised, but it keeps its importance and
anchor: if it trains again (a recurring region reuses its adapter) it is protected again. One that
appears after a consolidation (a grown adapter) is not penalised until the next one.

Quadratic penalties are ``sum_i Omega_i * (theta_i - theta*_i)^2`` with no constant factor: the
loop scales them, normally through ``DynamicStrength``, so only their shape matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Batch = Mapping[str, Tensor]


@runtime_checkable
class Regularizer(Protocol):
    """What the loop needs from a forgetting-protection method.

    ``needs_batch`` tells the loop whether ``penalty`` must get the current replay/general batch
    (``KLAnchor``); quadratic penalties ignore ``batch``.
    """

    needs_batch: bool

    def penalty(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        """Scalar, differentiable; exactly 0 before the first ``consolidate``."""
        ...

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        """Close a knowledge unit: fold its importance in and re-anchor at the current params."""
        ...

    def after_backward(self, model: nn.Module) -> None: ...

    def after_step(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(trainable_params(model).values())).device


class _Quadratic:
    """Shared machinery of EWC / MAS / SI: importance Omega and anchor theta*."""

    needs_batch = False

    def __init__(self, gamma: float = 1.0) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(
                f"gamma={gamma} is outside [0, 1]; use 1.0 to keep all past importance"
            )
        self.gamma = gamma
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.n_consolidations = 0

    def penalty(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        total = _zero(model)
        params = trainable_params(model)
        for name, omega in self.importance.items():
            p = params.get(name)
            if p is None:  # frozen since the last consolidation: it cannot drift
                continue
            total = total + (omega * (p - self.anchor[name]).float().pow(2)).sum()
        return total

    def _fold(self, model: nn.Module, new: Mapping[str, Tensor]) -> None:
        """Omega <- gamma * Omega + Omega_new; anchor <- current params."""
        params = trainable_params(model)
        # frozen parameters (an adapter that stopped training) keep their importance and anchor
        # as they were, so they are protected again if they ever train again (a reused adapter)
        folded = {n: o for n, o in self.importance.items() if n not in params}
        kept = {n: a for n, a in self.anchor.items() if n in folded}
        for name, p in params.items():
            old = self.importance.get(name)
            fresh = new.get(name, torch.zeros_like(p))
            folded[name] = fresh if old is None else self.gamma * old + fresh
        self.importance = folded
        self.anchor = {**kept, **snapshot(model)}
        self.n_consolidations += 1

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict:
        return {
            "kind": type(self).__name__,
            "importance": _clone(self.importance),
            "anchor": _clone(self.anchor),
            "n_consolidations": self.n_consolidations,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self, state)
        self.importance = _clone(state["importance"])
        self.anchor = _clone(state["anchor"])
        self.n_consolidations = int(state["n_consolidations"])


class OnlineEWC(_Quadratic):
    """Online EWC (Schwarz et al. 2018): diagonal empirical Fisher of the LM loss.

    ``consolidate`` computes ``F_new = mean_x (d NLL(x) / d theta)^2`` over the given batches'
    samples, folds ``F <- gamma * F + F_new`` and anchors at the current parameters.
    Memory: two copies of the trainable parameters (F and the anchor).
    """

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        self._fold(model, _per_sample_grad_mean(model, batches, _lm_loss, lambda g: g.pow(2)))


class MAS(_Quadratic):
    """Memory Aware Synapses (Aljundi et al. 2018): label-free output sensitivity.

    ``Omega_new = mean_x |d ||logits(x)||^2 / d theta|`` with ``||.||^2`` averaged over real
    tokens (``attention_mask``), so labels are not used. Folded like ``OnlineEWC``.
    Memory: two copies of the trainable parameters.
    """

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        self._fold(model, _per_sample_grad_mean(model, batches, _logit_sq_norm, torch.abs))


class SI(_Quadratic):
    """Synaptic Intelligence (Zenke et al. 2017): importance from the training path itself.

    Each step adds ``omega -= grad * (theta_after - theta_before)`` (the loss decrease each
    parameter is credited with, using the gradient that drove the step: read in ``after_step``,
    so clipping in between is accounted for). At ``consolidate``, with ``Delta`` the move since the
    unit began, ``Omega <- gamma * Omega + relu(omega / (Delta^2 + xi))`` and omega restarts.
    The relu is ours: noisy minibatches and Adam can make a path integral negative, and a
    negative weight would push parameters away from the anchor. ``batches`` are not used.

    Memory: four copies (Omega, anchor = unit start, omega, parameters before the step), the
    least a path integral allows; omega accumulates in at least fp32. ``xi`` damps parameters that barely moved; LoRA moves are small
    (|Delta| ~ 1e-3..1e-2), hence the default 1e-3 instead of the paper's 0.1.
    """

    def __init__(self, xi: float = 1e-3, gamma: float = 1.0) -> None:
        super().__init__(gamma)
        if xi <= 0:
            raise ValueError(f"SI xi={xi} must be > 0 (it damps Omega where Delta ~ 0); try 1e-3")
        self.xi = xi
        self.omega: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}

    def after_backward(self, model: nn.Module) -> None:
        for name, p in trainable_params(model).items():
            if name not in self.anchor:  # first sight: the unit (or this adapter) starts here
                self.anchor[name] = p.detach().clone()
            if name in self._before:
                self._before[name].copy_(p.detach())
            else:
                self._before[name] = p.detach().clone()

    def after_step(self, model: nn.Module) -> None:
        if not self._before:
            raise ValueError(
                "SI.after_step called without SI.after_backward; call it after backward"
            )
        for name, p in trainable_params(model).items():
            before = self._before.get(name)
            if before is None or p.grad is None:
                continue
            acc = _acc_dtype(p)
            step_credit = -p.grad.detach().to(acc) * (p.detach() - before).to(acc)
            if name in self.omega:
                self.omega[name] += step_credit
            else:
                self.omega[name] = step_credit
        self._before.clear()

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        new = {}
        for name, p in trainable_params(model).items():
            if name in self.omega and name in self.anchor:
                delta = (p.detach() - self.anchor[name]).to(self.omega[name].dtype)
                omega = (self.omega[name] / (delta.pow(2) + self.xi)).clamp_min(0.0)
                new[name] = omega.to(p.dtype)
        self._fold(model, new)
        self.omega = {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "omega": _clone(self.omega)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.omega = _clone(state["omega"])
        self._before = {}


class KLAnchor:
    """KL to a frozen reference on a given batch: LwF and general-sample replay in one object.

    ``penalty(model, batch)`` is ``T^2 * mean_tokens KL(p_ref(.|x; T) || p_model(.|x; T))`` over the
    real tokens (``attention_mask``) of ``batch``: feed the current batch for LwF, a replay or
    general-text batch for replay distillation. It costs one no-grad reference forward and one
    forward with grad on ``batch``. After the first consolidation, ``batch=None`` is an error.

    ``reference="base"``: the base model, adapters off (``PeftModel.disable_adapter()``); no copy.
    Call ``consolidate(model, [])`` once at the start to protect the base model from step 0.
    ``reference="last"``: the model at the last consolidation (one copy of the adapter weights),
    evaluated with ``torch.func.functional_call`` so the live parameters are never touched.
    A parameter created after the last consolidation is anchored at its value when first seen.
    """

    needs_batch = True

    def __init__(self, reference: Literal["base", "last"] = "last", temperature: float = 1.0):
        if reference not in ("base", "last"):
            raise ValueError(f"KLAnchor reference={reference!r}; use 'base' or 'last'")
        if temperature <= 0:
            raise ValueError(f"KLAnchor temperature={temperature} must be > 0; LwF used 2.0")
        self.reference = reference
        self.temperature = temperature
        self.active = False
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module, batch: Batch | None = None) -> Tensor:
        if not self.active:
            return _zero(model)
        if batch is None:
            raise ValueError(
                "KLAnchor.penalty needs batch=: pass the replay/general batch (needs_batch=True)"
            )
        inputs = _model_inputs(batch, _device_of(model))
        was_training = model.training
        model.eval()  # a deterministic target: no adapter dropout in the reference
        try:
            with torch.no_grad():
                ref_logits = self._reference_logits(model, inputs)  # (B, T, V)
        finally:
            model.train(was_training)
        logits = model(**inputs).logits  # (B, T, V)
        return _masked_kl(ref_logits, logits, inputs["attention_mask"], self.temperature)

    def _reference_logits(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        if self.reference == "base":
            with model.disable_adapter():
                return model(**inputs).logits
        for name, p in trainable_params(model).items():
            if name not in self.anchor:
                self.anchor[name] = p.detach().clone()
        present = dict(model.named_parameters())
        swap = {n: t for n, t in self.anchor.items() if n in present}
        return functional_call(model, swap, args=(), kwargs=inputs, strict=False).logits

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        self.active = True
        if self.reference == "last":
            self.anchor = snapshot(model)

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict:
        return {
            "kind": "KLAnchor",
            "reference": self.reference,
            "active": self.active,
            "anchor": _clone(self.anchor),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self, state)
        if state["reference"] != self.reference:
            raise ValueError(
                f"KLAnchor state has reference={state['reference']!r} but this object uses "
                f"{self.reference!r}; build KLAnchor(reference={state['reference']!r})"
            )
        self.active = bool(state["active"])
        self.anchor = _clone(state["anchor"])


def _masked_kl(ref_logits: Tensor, logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over mask of KL(softmax(ref/T) || softmax(logits/T)), in fp32."""
    log_p = F.log_softmax(ref_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature**2
