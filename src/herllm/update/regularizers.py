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

Each class registers itself under the name ``protect.regularizers`` uses
(``register_regularizer`` in ``registry.py``); the per-sample importances of EWC and MAS are
computed in ``importance.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from herllm.update.importance import _lm_loss, _logit_sq_norm, _per_sample_grad_mean
from herllm.update.params import (
    Batch,
    _acc_dtype,
    _check_kind,
    _clone,
    _device_of,
    _model_inputs,
    _zero,
    snapshot,
    trainable_params,
)
from herllm.update.registry import register_regularizer


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


@register_regularizer("ewc")
class OnlineEWC(_Quadratic):
    """Online EWC (Schwarz et al. 2018): diagonal empirical Fisher of the LM loss.

    ``consolidate`` computes ``F_new = mean_x (d NLL(x) / d theta)^2`` over the given batches'
    samples, folds ``F <- gamma * F + F_new`` and anchors at the current parameters.
    Memory: two copies of the trainable parameters (F and the anchor).
    """

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        self._fold(model, _per_sample_grad_mean(model, batches, _lm_loss, lambda g: g.pow(2)))


@register_regularizer("mas")
class MAS(_Quadratic):
    """Memory Aware Synapses (Aljundi et al. 2018): label-free output sensitivity.

    ``Omega_new = mean_x |d ||logits(x)||^2 / d theta|`` with ``||.||^2`` averaged over real
    tokens (``attention_mask``), so labels are not used. Folded like ``OnlineEWC``.
    Memory: two copies of the trainable parameters.
    """

    def consolidate(self, model: nn.Module, batches: Iterable[Batch]) -> None:
        self._fold(model, _per_sample_grad_mean(model, batches, _logit_sq_norm, torch.abs))


@register_regularizer("si", needs_full_grads=True)
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


@register_regularizer("kl", config={"reference": "kl_reference"})
class KLAnchor:
    """KL to a frozen reference on a given batch: LwF and general-sample replay in one object.

    ``penalty(model, batch)`` is ``T^2 * mean_tokens KL(p_ref(.|x; T) || p_model(.|x; T))`` over the
    real tokens (``attention_mask``) of ``batch``: feed the current batch for LwF, a replay or
    general-text batch for replay distillation. It costs one no-grad reference forward and one
    forward with grad on ``batch``. After the first consolidation, ``batch=None`` is an error.

    ``reference="base"``: the base model, adapters off (``PeftModel.disable_adapter()``); no copy.
    ``start(model)`` (the loop calls it at a run's first step) protects the base model from step 0.
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

    def start(self, model: nn.Module) -> None:
        """At a run's first step: a base-anchored KL is active from step 0."""
        if self.reference == "base" and not self.active:
            self.consolidate(model, [])

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
