"""Meta-experience replay: Reptile-style interpolation of the trainable parameters.

Every ``every`` optimizer steps::

    theta  <- anchor + epsilon * (theta - anchor)
    anchor <- theta

Trained on batches that mix new and replayed experiences, this is the Reptile meta-update that
MER (Riemer et al. 2019) uses: to second order it adds a term that rewards agreement (positive
inner products) between the gradients of the batches inside each window, so updates for new data
are pulled towards directions that do not hurt replayed data. Only trainable parameters (the
LoRA weights) are touched; one copy of them is kept as the anchor.

The loop calls it explicitly::

    reptile = Reptile()
    reptile.attach(model)                      # once, before the first optimizer step
    ...
    optimizer.step()
    reptile.after_step(model, optimizer)       # returns True when it interpolated
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from herllm.update.params import snapshot, trainable_params

# Optimizer state entries that hold a running first moment (a direction of travel).
_FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")


class Reptile:
    """Reptile interpolation every ``every`` optimizer steps.

    Defaults, for a ~7M-parameter model adapted with LoRA over a few thousand steps:

    - ``every=50``. MER's k=500 at large scale would give only a handful of meta-steps in such a
      run (none inside a short knowledge unit). The implicit gradient-alignment term grows with
      the number of steps in the window (~k^2 lr^2), while a window longer than a unit mixes units
      and gives nothing to align. 50 steps is long enough for Adam on LoRA to move the weights
      along a real direction, and short enough for dozens of meta-steps per unit.
    - ``epsilon=0.5``. Over horizons longer than ``every`` the net progress is scaled by epsilon,
      like dividing the learning rate by 1/epsilon: 0.1 (MER's large-scale value) would make a
      run of a few thousand steps learn each new region ~10x slower, which it cannot afford.
      0.5 halves long-range drift (the stability we want) and keeps plasticity. To sweep:
      every in {20, 50, 100} x epsilon in {0.3, 0.5, 0.7}.

    Optimizer moments (``reset_momentum=True``): after the interpolation the first moment (Adam
    ``exp_avg``, SGD ``momentum_buffer``) still points along the path just shrunk, and would
    immediately re-apply the motion that the meta-step undid, so it is zeroed. The second moment
    (``exp_avg_sq``) and Adam's step count are kept: they measure the gradient scale, which the
    move does not change, and zeroing them under an unchanged bias correction would make the
    next steps far too large.

    Parameters that appear after ``attach`` (a grown adapter) are anchored at their value when
    first seen; anchors of parameters that are no longer trainable are dropped.
    """

    def __init__(self, every: int = 50, epsilon: float = 0.5, reset_momentum: bool = True):
        if every < 1:
            raise ValueError(f"Reptile every={every} must be >= 1 optimizer step; try 50")
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"Reptile epsilon={epsilon} is outside (0, 1]; 1 disables it, try 0.5")
        self.every = every
        self.epsilon = epsilon
        self.reset_momentum = reset_momentum
        self.anchor: dict[str, Tensor] | None = None
        self.steps = 0

    def attach(self, model: nn.Module) -> None:
        """Anchor at the current trainable parameters; call once before the first step."""
        self.anchor = snapshot(model)
        self.steps = 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count one optimizer step; interpolate on every ``every``-th. True if it did."""
        if self.anchor is None:
            raise ValueError(
                "Reptile.after_step called before Reptile.attach(model); attach once before training"
            )
        self.steps += 1
        if self.steps % self.every:
            return False
        params = trainable_params(model)
        with torch.no_grad():
            for name, p in params.items():
                anchor = self.anchor.get(name)
                if anchor is None:
                    self.anchor[name] = p.detach().clone()
                    continue
                # lerp: theta + (1 - eps) * (anchor - theta) == anchor + eps * (theta - anchor),
                # and exactly theta when eps == 1.
                p.lerp_(anchor, 1.0 - self.epsilon)
                anchor.copy_(p)
        self.anchor = {n: a for n, a in self.anchor.items() if n in params}
        if optimizer is not None and self.reset_momentum:
            _zero_first_moments(optimizer, list(params.values()))
        return True

    def state_dict(self) -> dict:
        anchor = None if self.anchor is None else {n: a.clone() for n, a in self.anchor.items()}
        return {"kind": "Reptile", "steps": self.steps, "anchor": anchor}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "Reptile":
            raise ValueError(
                f"Reptile.load_state_dict got state of kind {state.get('kind')!r}; "
                "load the state saved by a Reptile"
            )
        self.steps = int(state["steps"])
        anchor = state["anchor"]
        self.anchor = None if anchor is None else {n: a.clone() for n, a in anchor.items()}


def _zero_first_moments(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    for p in params:
        state = optimizer.state.get(p, {})
        for key in _FIRST_MOMENT_KEYS:
            buf = state.get(key)
            if isinstance(buf, Tensor):
                buf.zero_()
