"""Scoring a shift detector against true boundaries (known only to the evaluator)."""

from __future__ import annotations


def match_events(boundaries: list[int], confirmed: list[int], n_samples: int) -> dict:
    """Delays, misses and false alarms of detected shifts.

    boundaries: first sample index of domains 1..T-1 (domain 0 starts at 0); confirmed: sample
    index at which each event was confirmed, in order. An event belongs to the segment it was
    confirmed in; the first one in segment i > 0 detects boundary i (delay = confirmed - boundary);
    a boundary without one is missed; every other event is a false alarm.
    """
    edges = [0, *boundaries, n_samples]
    delays, misses, false_alarms = [], 0, [0] * (len(edges) - 1)
    for seg in range(len(edges) - 1):
        inside = [c for c in confirmed if edges[seg] <= c < edges[seg + 1]]
        if seg > 0:
            if inside:
                delays.append(inside[0] - edges[seg])
                inside = inside[1:]
            else:
                misses += 1
        false_alarms[seg] += len(inside)
    return {
        "delays": delays,
        "misses": misses,
        "false_alarms_per_domain": false_alarms,
        "false_alarms_per_10k": 1e4 * sum(false_alarms) / max(n_samples, 1),
    }
