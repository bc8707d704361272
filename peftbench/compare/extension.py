"""A search that does not stop at its grid's edge.

When the best point of an entry's grid lies on the edge of a numeric axis (the largest learning rate of
the grid, say), the optimum may lie beyond it: the search tries the next point in that direction, with
the grid's own spacing (a ratio for a grid of positive values, a step otherwise), and does so again
while the best point keeps moving outward, at most ``search.extend`` times per entry. Only the axes
where the best point sits on an edge move; the other keys keep the best point's values.
"""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def beyond(edge: float, neighbour: float) -> float:
    """The next value past ``edge``, away from ``neighbour``, with the grid's spacing: geometric for two
    positive values (1e-4, 1e-3 -> 1e-2), arithmetic otherwise (0, 0.05 -> 0.1). Rounded to 4 significant
    figures, so that directory names and reports stay readable."""
    if edge > 0 and neighbour > 0:
        value = edge * (edge / neighbour)
    else:
        value = edge + (edge - neighbour)
    value = float(f"{value:.4g}")
    return int(value) if isinstance(edge, int) and isinstance(neighbour, int) and value.is_integer() else value


def outward_points(best: dict[str, Any], tried: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grid points just past ``best`` on each numeric axis where ``best`` is the largest or smallest value
    tried (among points that share best's other coordinates), skipping points already tried."""
    points = []
    for key, value in best.items():
        if not _is_number(value):
            continue
        line = sorted({p[key] for p in tried if _is_number(p.get(key))
                       and all(p.get(k) == v for k, v in best.items() if k != key)})
        if len(line) < 2:
            continue  # one value gives no direction and no spacing
        if value == line[-1]:
            points.append({**best, key: beyond(line[-1], line[-2])})
        elif value == line[0]:
            points.append({**best, key: beyond(line[0], line[1])})
    seen = [dict(p) for p in tried]
    return [p for p in points if p not in seen]
