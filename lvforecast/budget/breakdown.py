"""What the formulas of :mod:`lvforecast.budget.formulas` return: :class:`Component` lines in a :class:`Breakdown`
(table, JSON, scaling); pure, no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lvforecast.budget.shapes import Conventions


@dataclass(frozen=True)
class Component:
    """One line of a breakdown: its name (shared with :mod:`lvforecast.budget.audit`), a Python-evaluable formula
    over the breakdown's symbols, and its value in FLOPs."""

    name: str
    formula: str
    flops: int


@dataclass(frozen=True)
class Breakdown:
    """FLOPs of one pass split by ordered components; ``label`` says what was counted (e.g. ``forward`` or
    ``train step = 3 x forward``), ``symbols`` the values of the formulas' symbols (``{"L": 24, "B": 4, ...}``)."""

    label: str
    components: tuple[Component, ...]
    symbols: dict[str, int] = field(default_factory=dict)
    conventions: Conventions = field(default_factory=Conventions)

    @property
    def total(self) -> int:
        """Sum of all components, in FLOPs."""
        return sum(c.flops for c in self.components)

    def as_dict(self, nonzero: bool = False) -> dict[str, int]:
        """Component name -> FLOPs (optionally dropping zero components), in breakdown order."""
        return {c.name: c.flops for c in self.components if c.flops or not nonzero}

    def scaled(self, factor: int, label: str) -> Breakdown:
        """Every component times an integer ``factor`` (e.g. 3 for a training step)."""
        comps = tuple(Component(c.name, f"{factor}*({c.formula})", factor * c.flops) for c in self.components)
        return dataclasses.replace(self, label=label, components=comps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``label``, ``total``, ``conventions``, ``symbols`` and ``components``."""
        return dict(label=self.label, total=self.total, conventions=dataclasses.asdict(self.conventions),
                    symbols=dict(self.symbols), components=[dataclasses.asdict(c) for c in self.components])

    def table(self, title: str = "") -> str:
        """The breakdown as a fixed-width table (component, formula, FLOPs, share)."""
        total = self.total
        head = ["component", "formula", "FLOPs", "share"]
        rows = [[c.name, c.formula, f"{c.flops:,}", f"{100 * c.flops / total:.2f}%" if total else "-"]
                for c in self.components]
        foot = ["total", "", f"{total:,}", "100.00%" if total else "-"]
        widths = [max(len(r[i]) for r in [head, *rows, foot]) for i in range(4)]

        def line(r: list[str]) -> str:
            return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()

        rule = "-" * len(line(head))
        symbols = " ".join(f"{k}={v}" for k, v in self.symbols.items())
        out = [f"{title or self.label}: {total:.4e} FLOPs", f"conventions: {self.conventions.describe()}",
               f"symbols: {symbols}", rule, line(head), rule, *map(line, rows), rule, line(foot)]
        return "\n".join(out)
