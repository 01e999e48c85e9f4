"""Realistic signal tables: what an EA's table looks like and how it changes.

`SignalTable` is a random walk per pair and timeframe over -100..100, coloured as a strength EA
colours it; its rows are the seed's JSON (`pair`, `TF_data`, `sum`, `sum_cell_color`). With the
28 majors and crosses and 9 timeframes a publish is about 11.5 KB of JSON.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

PAIRS = (
    "EURUSD", "GBPUSD", "USDJPY", "USDCHF", "AUDUSD", "USDCAD", "NZDUSD",
    "EURGBP", "EURJPY", "EURCHF", "EURAUD", "EURCAD", "EURNZD",
    "GBPJPY", "GBPCHF", "GBPAUD", "GBPCAD", "GBPNZD",
    "AUDJPY", "AUDCHF", "AUDCAD", "AUDNZD",
    "NZDJPY", "NZDCHF", "NZDCAD",
    "CADJPY", "CADCHF", "CHFJPY",
)  # the 28 majors and crosses  # fmt: skip
TFS = ("M1", "M5", "M15", "M30", "H1", "H4", "D1", "W1", "MN1")


def colour(value: float, strong: float = 60.0, weak: float = 20.0) -> str:
    """The MQL5 colour a strength EA gives a value: strong, weak or no signal either way."""
    if value >= strong:
        return "clrLimeGreen"
    if value >= weak:
        return "clrGreen"
    if value <= -strong:
        return "clrRed"
    if value <= -weak:
        return "clrOrangeRed"
    return "clrGray"


class SignalTable:
    """A random walk per pair and timeframe that looks like an EA's signal table.

    Each step moves `change` of the cells (at least one, chosen afresh each step) and leaves the
    rest exactly as they were, as an EA's table changes between two publishes: 0.1 is about
    what a strength EA on a live market shows; 1.0 moves every cell.
    """

    def __init__(
        self, rng: random.Random, pairs: Sequence[str] = PAIRS, change: float = 1.0
    ) -> None:
        if not 0.0 < change <= 1.0:
            raise ValueError(f"change must be in (0, 1], not {change}")
        self.rng = rng
        self.values = {(p, tf): rng.uniform(-80, 80) for p in pairs for tf in TFS}
        self.pairs = pairs
        self.change = change
        self._cells = list(self.values)

    def step(self, change: float | None = None) -> list[dict[str, Any]]:
        """Move `change` (by default the table's) of the cells a little; the table's rows as the
        EA would publish them."""
        fraction = self.change if change is None else change
        if fraction >= 1.0:
            moving: Iterable[tuple[str, str]] = self._cells
        else:
            count = max(1, round(fraction * len(self._cells)))
            moving = self.rng.sample(self._cells, count)
        for cell in moving:
            v = self.values[cell] + self.rng.gauss(0, 4)
            self.values[cell] = max(-100.0, min(100.0, v))
        rows = []
        for pair in self.pairs:
            cells = []
            for tf in TFS:
                v = self.values[pair, tf]
                cells.append({tf: round(v, 1), "cell_color": colour(v)})
            total = round(sum(self.values[pair, tf] for tf in TFS) / len(TFS), 1)
            rows.append(
                {"pair": pair, "TF_data": cells, "sum": total, "sum_cell_color": colour(total)}
            )
        return rows
