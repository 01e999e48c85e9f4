"""The context an attack runs in, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .common import Plan
from .hub import HubProcess, Sampler


@dataclass
class Ctx:
    name: str
    plan: Plan
    hub: HubProcess
    sampler: Sampler
    seed: int
    baseline: dict[str, Any]  # /healthz before the attack
    metrics_before: dict[str, float]
    tables: set[tuple[str, str]]  # every table the hub holds before the attack
    primed: dict[tuple[str, str], str]  # restart/kill: tables published once, and their data


@dataclass
class Attack:
    outcome: str  # for the table
    figures: dict[str, Any]
    window_end: float  # wall clock: the end of the witness's measured window
    recover_s: float | None
    recover_what: str
    checks_failed: list[str] = field(default_factory=list)
    restored_behind: int | None = None  # restart/kill
