"""Routing figures of an expanding run: accuracy, confusion, and the gap to oracle routing.

Only the evaluator knows domains. The oracle adapter of a domain is the adapter that was
training when the domain's stream ended (what a task id would have chosen); learned routing
is what `RoutedModel` picks from the input alone.
"""

from __future__ import annotations

import numpy as np

from herllm.evaluate import metrics as M
from herllm.refine.scoring import mean_nll
from herllm.update.adapters import BASE, RoutedModel


def routing_figures(
    routed_model: RoutedModel, domain_batches: dict[str, list[dict]], oracle: dict[str, str]
) -> dict:
    """Accuracy and confusion of learned routing, and held-out loss under learned vs oracle
    routing for every domain in `oracle` (domain -> adapter)."""
    domains = list(oracle)
    model, bank = routed_model._model, routed_model._bank
    extra: list[str] = []  # routes that are no domain's oracle adapter (and the base model)
    true, routed = [], []
    learned, forced = {}, {}
    for i, d in enumerate(domains):
        routed_model.record = []  # one routing pass per batch: the loss and the routes share it
        learned[d] = mean_nll(routed_model, domain_batches[d])[0]
        names, routed_model.record = routed_model.record, None
        for name in names:
            if name == oracle[d]:
                j = i
            elif name in oracle.values():
                j = next(k for k, e in enumerate(domains) if oracle[e] == name)
            else:
                if name not in extra:
                    extra.append(name)
                j = len(domains) + extra.index(name)
            true.append(i)
            routed.append(j)
        forced[d] = mean_nll(RoutedModel(model, bank, force=oracle[d]), domain_batches[d])[0]
    conf = M.routing_confusion(true, routed, len(domains), len(domains) + len(extra))
    gaps = [(learned[d] - forced[d]) / forced[d] for d in domains]
    return {
        "accuracy": M.routing_accuracy(conf),
        "confusion": conf.tolist(),
        "routes": domains + [("base model" if e == BASE else e) for e in extra],
        "oracle": oracle,
        "loss_learned": learned,
        "loss_oracle": forced,
        "oracle_gap": float(np.mean(gaps)),
    }
