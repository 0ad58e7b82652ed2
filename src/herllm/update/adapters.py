"""Progressive expansion: one LoRA adapter per region of the stream, routed without task ids.

When a detected shift leads somewhere far from every knowledge unit, the adapter being trained
is frozen and a fresh one is added for the new region; when it leads back near a unit, that
unit's adapter trains again (recurring domains do not grow new ones). While a new adapter
trains, an O-LoRA penalty (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model
Continual Learning") keeps its A matrices orthogonal to those of the frozen adapters.

Routing keys live in the base model's representation space (mean-pooled last hidden state with
every adapter off), so a key does not move while adapters train and an input can be routed
before any adapter runs. A key is a small density model of one unit: a robust centre and a
diagonal scale; an input's distance to a unit is measured in units of that unit's own median
distance (`RoutingKey.ratio`), so keys of tight and diffuse regions compare fairly.

Two ways to compose adapters at inference (`expand.compose`):
- `route`: each input uses its most likely unit's adapter (PEFT mixed-adapter batches, so a
  batch may mix adapters); an input farther than `expand.fallback_radius` from that unit uses
  what `expand.fallback` says: that adapter still (`nearest`), the adapter trained last
  (`recent`) or the base model (`base`);
- `sum`: every adapter is active and their deltas add up, as O-LoRA does (no routing).

Short inputs lie farther from every key than the windows the keys were fit on (a mean over few
tokens is noisier; on herllm-tiny a 50-character prompt sits at 2.5-2.8 median distances from
its own unit's key, a 128-token window at about 1.1), so the radius widens for an input of n
tokens by sqrt(key tokens / n), the factor by which the spread of a mean over n tokens exceeds
that over the key's windows.

Growth is bounded: past `expand.max_adapters` the two adapters with the closest keys are merged
with PEFT's `add_weighted_adapter(combination_type="cat")`, which stacks their ranks, so the
merged delta is exactly the sum of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from herllm.acquire.chunks import window_batches
from herllm.refine.scoring import base_pooled_states

BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed-adapter batch."""

FALLBACKS = ("nearest", "recent", "base")
"""What an input beyond the fallback radius uses (`expand.fallback`)."""


# -- representations --------------------------------------------------------------------------


def _peft(model):
    """The PeftModel inside an Accelerate/DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def base_reps(model, batches: list[dict]) -> Tensor:
    """(N, H) mean-pooled last hidden states of the base model (adapters off), on the CPU."""
    out = [base_pooled_states(model, b) for b in batches]
    return torch.cat(out) if out else torch.zeros(0, 0)


# -- routing keys -----------------------------------------------------------------------------


@dataclass
class RoutingKey:
    """Diagonal density model of one unit's base representations."""

    unit: str
    adapter: str
    center: np.ndarray  # (H,)
    scale: np.ndarray  # (H,) per-dimension spread, floored
    median: float  # median scaled distance of the unit's own samples
    n: int
    tokens: float = 0.0  # mean tokens per sample it was fit on (0: unknown, as in old runs)

    @classmethod
    def fit(
        cls, unit: str, adapter: str, reps: np.ndarray, trim: float = 0.25, tokens: float = 0.0
    ) -> RoutingKey:
        """Robust fit: start at the coordinate-wise median, keep the (1 - trim) closest samples
        (a unit's first samples can belong to the region before it, up to the detection delay),
        then take their mean and spread. `tokens`: mean tokens per sample (widens the fallback
        radius for shorter inputs)."""
        reps = np.asarray(reps, dtype=np.float64)
        if len(reps) < 2:
            raise ValueError(f"a routing key needs at least 2 samples, got {len(reps)}")
        med = np.median(reps, axis=0)
        d = np.linalg.norm(reps - med, axis=1)
        keep = reps[np.argsort(d)[: max(2, int(round(len(reps) * (1 - trim))))]]
        center = keep.mean(0)
        spread = keep.std(0)
        scale = spread + 0.1 * float(np.mean(spread)) + 1e-6  # floor: few samples, many dims
        own = np.sqrt((((keep - center) / scale) ** 2).mean(1))
        median = float(np.median(own)) + 1e-9
        return cls(unit, adapter, center, scale, median, len(reps), float(tokens))

    def ratio(self, reps: np.ndarray) -> np.ndarray:
        """(N,) distance of each sample in units of this key's median own-sample distance."""
        d = np.sqrt(
            (((np.asarray(reps, dtype=np.float64) - self.center) / self.scale) ** 2).mean(1)
        )
        return d / self.median

    def loglik(self, reps: np.ndarray) -> np.ndarray:
        """(N,) diagonal-Gaussian log-likelihood (up to a constant shared by every key)."""
        z = (np.asarray(reps, dtype=np.float64) - self.center) / self.scale
        return -0.5 * (z**2).sum(1) - np.log(self.scale).sum()

    def state(self) -> dict:
        return asdict(self)


def widening(own: np.ndarray, tokens) -> np.ndarray:
    """(N,) factor on the fallback radius for inputs of `tokens` (N,) tokens routed to keys fit
    on samples of `own` (N,) tokens: sqrt(own / n) for shorter inputs, else 1 (and 1 where `own`
    is 0, unknown: keys saved before it was recorded)."""
    n = np.maximum(np.asarray(tokens, dtype=np.float64), 1.0)
    own = np.asarray(own, dtype=np.float64)
    return np.where(own > 0, np.sqrt(np.maximum(own / n, 1.0)), 1.0)


# -- the bank ---------------------------------------------------------------------------------


@dataclass
class AdapterBank:
    """Which adapters exist, which one trains, and the routing keys of the units they hold."""

    current: str
    compose: str = "route"
    reuse_radius: float = 1.3
    fallback_radius: float = 2.5
    max_adapters: int = 8
    fallback: str = "nearest"  # one of FALLBACKS; runs saved before it existed get `nearest`
    # adapter name -> {"units": [unit ids], "created_step": int}
    adapters: dict[str, dict] = field(default_factory=dict)
    keys: dict[str, RoutingKey] = field(default_factory=dict)  # unit id -> key
    grown: int = 0
    merged: int = 0

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback={self.fallback!r}; choose one of {', '.join(FALLBACKS)}")
        self.register(self.current)

    # -- routing -------------------------------------------------------------------------------
    def nearest(self, reps, keys: list[RoutingKey] | None = None):
        """Most likely unit per input (diagonal-Gaussian likelihood) and the distance ratio to it.

        Returns (keys, best index (N,), ratio to the best (N,)); no keys -> empty list."""
        keys = list(self.keys.values()) if keys is None else list(keys)
        reps = np.asarray(reps, dtype=np.float64)
        if not keys:
            return [], np.zeros(len(reps), dtype=int), np.full(len(reps), np.inf)
        best = np.stack([k.loglik(reps) for k in keys], 1).argmax(1)  # (N,)
        ratios = np.stack([k.ratio(reps) for k in keys], 1)  # (N, K)
        return keys, best, ratios[np.arange(len(reps)), best]

    def route(self, reps, extra: list[RoutingKey] = (), tokens=None) -> list[str]:
        """Adapter name per input: its most likely unit's, or `fallback`'s choice for an input
        beyond `fallback_radius` of that unit (widened for inputs of few `tokens` (N,))."""
        keys, best, ratio = self.nearest(reps, [*self.keys.values(), *extra])
        instead = {"recent": self.current, "base": BASE}.get(self.fallback)
        if not keys:  # nothing to compare with yet: only the adapter in training has learned
            return [instead or self.current] * len(best)
        radius = np.full(len(best), self.fallback_radius)
        if tokens is not None:
            radius *= widening(np.array([keys[j].tokens for j in best]), tokens)
        return [
            keys[j].adapter if r <= limit or instead is None else instead
            for j, r, limit in zip(best, ratio, radius, strict=True)
        ]

    def decide(self, reps) -> tuple[str | None, float]:
        """At a shift: the adapter of the unit the new region lies near (reuse), or None (grow);
        with the median distance ratio of the new samples to their most likely unit."""
        keys, best, ratio = self.nearest(reps)
        if not keys:
            return None, float("inf")
        j = int(np.bincount(best, minlength=len(keys)).argmax())
        mine = best == j
        near = float(np.median(ratio[mine]))
        if mine.sum() * 2 > len(best) and near <= self.reuse_radius:
            return keys[j].adapter, near
        return None, float(np.median(ratio))

    def closest_pair(self) -> tuple[str, str]:
        """The two adapters whose keys are closest (symmetric ratio between centres)."""
        names = list(self.adapters)
        best, pair = float("inf"), (names[0], names[1])
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ka = [k for k in self.keys.values() if k.adapter == a]
                kb = [k for k in self.keys.values() if k.adapter == b]
                if not ka or not kb:
                    continue
                d = min(
                    float(x.ratio(y.center[None])[0] + y.ratio(x.center[None])[0])
                    for x in ka
                    for y in kb
                )
                if d < best:
                    best, pair = d, (a, b)
        return pair

    def register(self, name: str, step: int = 0, units: list[str] | None = None) -> None:
        """Record adapter `name` (created at `step`, holding `units`) if it is new."""
        self.adapters.setdefault(name, {"units": list(units or []), "created_step": step})

    def add_key(self, key: RoutingKey) -> None:
        self.keys[key.unit] = key
        units = self.adapters[key.adapter]["units"]
        if key.unit not in units:
            units.append(key.unit)

    def frozen(self) -> list[str]:
        return [a for a in self.adapters if a != self.current]

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "current": self.current,
            "compose": self.compose,
            "reuse_radius": self.reuse_radius,
            "fallback_radius": self.fallback_radius,
            "max_adapters": self.max_adapters,
            "fallback": self.fallback,
            "adapters": {k: dict(v, units=list(v["units"])) for k, v in self.adapters.items()},
            "keys": {u: k.state() for u, k in self.keys.items()},
            "grown": self.grown,
            "merged": self.merged,
        }

    @classmethod
    def from_state(cls, state: dict) -> AdapterBank:
        keys = {u: RoutingKey(**k) for u, k in state["keys"].items()}
        fields = {k: v for k, v in state.items() if k != "keys"}
        return cls(**fields, keys=keys)


# -- PEFT operations --------------------------------------------------------------------------


def lora_layers(model) -> list[nn.Module]:
    return [m for m in _peft(model).modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def orthogonality(model, new: str, frozen: list[str]) -> Tensor:
    """O-LoRA overlap: sum over layers and frozen adapters of |A_old A_new^T| (entrywise L1).

    PEFT stores A as (r, in_features), so `A_old @ A_new.T` is (r_old, r_new): zero exactly when
    the new adapter's input subspace is orthogonal to every frozen one.
    """
    total = None
    for layer in lora_layers(model):
        if new not in layer.lora_A:
            continue
        a_new = layer.lora_A[new].weight  # (r, d)
        for old in frozen:
            if old in layer.lora_A:
                term = (layer.lora_A[old].weight.detach() @ a_new.T).abs().sum()
                total = term if total is None else total + term
    if total is None:
        p = next(_peft(model).parameters())
        return torch.zeros((), device=p.device, dtype=torch.float32)
    return total.float()


def activate(model, bank: AdapterBank) -> None:
    """Make the forward pass and `requires_grad` match the bank: the current adapter trains;
    with `sum` every adapter is active (the frozen ones re-frozen: PEFT's multi-adapter
    `set_adapter` marks all of them trainable)."""
    peft = _peft(model)
    if bank.compose == "sum" and len(bank.adapters) > 1:
        peft.base_model.set_adapter(list(bank.adapters))
    else:
        peft.base_model.set_adapter(bank.current)
    for layer in lora_layers(peft):
        for mod_dict in (layer.lora_A, layer.lora_B):
            for name, mod in mod_dict.items():
                mod.requires_grad_(name == bank.current)


def add_adapter(model, name: str, config) -> None:
    """A fresh adapter with PEFT LoRA `config` (PEFT initialises B to zero: no change yet)."""
    _peft(model).add_adapter(name, config)


def fresh_config(model, lora):
    """PEFT config of a new adapter: the run's rank and alpha (`lora`), on the modules the
    existing adapters target (already resolved from `all-linear`)."""
    import copy

    cfg = copy.deepcopy(next(iter(_peft(model).peft_config.values())))
    cfg.r, cfg.lora_alpha, cfg.lora_dropout = lora.r, lora.alpha, lora.dropout
    cfg.rank_pattern, cfg.alpha_pattern = {}, {}
    return cfg


@torch.no_grad()
def copy_adapter(model, src: str, dst: str) -> bool:
    """Start adapter `dst` from `src`'s weights: a warm start that keeps learning where the
    stream left off, while `src` stays frozen as it was. False (nothing copied) when the ranks
    differ (`src` is a merged adapter)."""
    pairs = [
        (d[src].weight, d[dst].weight)
        for layer in lora_layers(model)
        if src in layer.lora_A and dst in layer.lora_A
        for d in (layer.lora_A, layer.lora_B)
    ]
    if not pairs or any(a.shape != b.shape for a, b in pairs):
        return False
    for a, b in pairs:
        b.copy_(a)
    return True


def merge_adapters(model, a: str, b: str, name: str) -> None:
    """Replace adapters `a` and `b` by `name`, whose delta is exactly delta_a + delta_b."""
    peft = _peft(model)
    peft.add_weighted_adapter([a, b], [1.0, 1.0], name, combination_type="cat")
    peft.delete_adapter(a)
    peft.delete_adapter(b)


# -- inference ---------------------------------------------------------------------------------


class RoutedModel:
    """A PEFT model that routes every input to its unit's adapter (see module doc).

    Calls and `generate` take the same arguments as the model; everything else is delegated, so
    evaluators written for a plain model (`mean_nll`, probes, generation) work unchanged.
    `force` pins one adapter (or BASE) for every input.
    """

    def __init__(self, model, bank: AdapterBank, extra_keys: list[RoutingKey] = (), force=None):
        self._model = model
        self._bank = bank
        self._extra = list(extra_keys)
        self._force = force
        self.last_routes: list[str] = []
        self.record: list[str] | None = None
        """When a list, every call's routes are appended to it (evaluators read them back)."""

    def __getattr__(self, name):
        return getattr(self._model, name)

    def routes(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[str]:
        if self._force is not None:
            return [self._force] * len(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        reps = base_reps(self._model, [{"input_ids": input_ids, "attention_mask": attention_mask}])
        tokens = attention_mask.sum(1).cpu().numpy()  # (B,) real tokens (padding left out)
        return self._bank.route(reps.numpy(), self._extra, tokens)

    def _names(self, input_ids, attention_mask) -> list[str] | None:
        if self._bank.compose == "sum" and self._force is None:
            return None  # every adapter is active
        self.last_routes = self.routes(input_ids, attention_mask)
        if self.record is not None:
            self.record.extend(self.last_routes)
        return self.last_routes

    def __call__(self, input_ids=None, attention_mask=None, **kw):
        names = self._names(input_ids, attention_mask)
        if names is None:
            return self._model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        if self._model.training:
            raise RuntimeError("RoutedModel is for inference; call .eval() first")
        return self._model(
            input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **kw
        )

    def generate(self, input_ids=None, attention_mask=None, **kw):
        names = self._names(input_ids, attention_mask)
        if names is not None:
            kw["adapter_names"] = names
        return self._model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


def window_reps(model, windows, seq_len: int, pad_id: int, device, known=None) -> np.ndarray:
    """(N, H) base representations of windows (token ids, loss mask): the `known` ones (a list
    aligned with `windows`, as the scoring pass kept them) as they are, the others (None, or all
    when `known` is None) from a base pass."""
    known = list(known) if known is not None else [None] * len(windows)
    missing = [i for i, r in enumerate(known) if r is None]
    if missing:
        batches = window_batches([windows[i] for i in missing], seq_len, pad_id, device)
        for i, rep in zip(missing, base_reps(model, batches).numpy(), strict=True):
            known[i] = rep
    return np.stack(known)


def fit_unit_key(
    model, reservoir, unit: str, adapter: str, seq_len: int, pad_id: int, device, reps=None
) -> RoutingKey | None:
    """Routing key of a unit from its reservoir windows (token ids, loss mask); None if < 8.
    `reps`: the windows' base representations where the scoring pass kept them (`window_reps`)."""
    if len(reservoir) < 8:
        return None
    tokens = float(np.mean([len(ids) for ids, _ in reservoir]))
    x = window_reps(model, reservoir, seq_len, pad_id, device, reps)  # (N, H)
    return RoutingKey.fit(unit, adapter, x, tokens=tokens)
