"""Realistic signal tables: what an EA's table looks like and how it changes.

`SignalTable` is a random walk per pair and timeframe over -100..100, coloured as a strength EA
colours it; its rows are the seed's JSON (`pair`, `TF_data`, `sum`, `sum_cell_color`). With the
28 majors and crosses and 9 timeframes a publish is about 11.5 KB of JSON.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
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
    """A random walk per pair and timeframe that looks like an EA's signal table."""

    def __init__(self, rng: random.Random, pairs: Sequence[str] = PAIRS) -> None:
        self.rng = rng
        self.values = {(p, tf): rng.uniform(-80, 80) for p in pairs for tf in TFS}
        self.pairs = pairs

    def step(self) -> list[dict[str, Any]]:
        """Move every cell a little; the table's rows as the EA would publish them."""
        rows = []
        for pair in self.pairs:
            cells = []
            for tf in TFS:
                v = self.values[pair, tf] + self.rng.gauss(0, 4)
                v = self.values[pair, tf] = max(-100.0, min(100.0, v))
                cells.append({tf: round(v, 1), "cell_color": colour(v)})
            total = round(sum(self.values[pair, tf] for tf in TFS) / len(TFS), 1)
            rows.append(
                {"pair": pair, "TF_data": cells, "sum": total, "sum_cell_color": colour(total)}
            )
        return rows
