"""What compile did, as data (``Report``) and as a readable table (``str(report)``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GroupReport:
    id: int
    first_member: str
    total: int
    kept: int
    total_score: float
    kept_score: float


@dataclass
class PartReport:
    """A submodule captured alone in a partitioned model, and its parameters before and after."""

    path: str
    capture: str
    calls: int
    params_before: int
    params_after: int
    coupled_inputs: int  # inputs fed by another part's output, pruned with it


@dataclass
class Report:
    budget: str
    importance: str
    solver: str
    groups: list[GroupReport]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    predicted_before: float  # of the budget's metric (ms for latency)
    predicted_after: float
    capacity: float
    solver_seconds: float
    iterations: int
    predicted_latency_ms_before: float | None = None
    predicted_latency_ms_after: float | None = None
    measured_latency_ms_before: float | None = None
    measured_latency_ms_after: float | None = None
    engine: str | None = None
    capture: str = "fx"  # the front end that captured the model: fx, export or export-strict
    latency_step: int | None = None  # channels the engine's latency moves in (latency budgets)
    # the closed loop (passes/refine.py): the tables' own prediction for the returned plan, the whole
    # models timed (predicted share, measured share, source), and what predicted_latency_ms_after is:
    # "tables", "corrected" (by the points) or "measured" (the plan itself was timed)
    predicted_latency_ms_tables_after: float | None = None
    latency_points: list = field(default_factory=list)
    latency_prediction: str = "tables"
    notes: list[str] = field(default_factory=list)
    parts: list[PartReport] = field(default_factory=list)  # a partitioned model: each part captured alone

    def __str__(self) -> str:
        lines = [f"fxprune.compile: budget {self.budget}, importance {self.importance}, solver {self.solver} "
                 f"({self.solver_seconds * 1e3:.0f} ms, {self.iterations} solves), captured by {self.capture}",
                 f"  predicted {self._metric_name()}: {self.predicted_before:.4g} -> {self.predicted_after:.4g} "
                 f"(budget {self.capacity:.4g})",
                 f"  FLOPs:  {self.flops_before:,} -> {self.flops_after:,} "
                 f"({self.flops_after / max(self.flops_before, 1):.1%})",
                 f"  params: {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / max(self.params_before, 1):.1%})"]
        lines += self._latency_lines()
        if self.parts:
            lines.append(f"  {'part':<28} {'captured by':<12} {'calls':>5} {'params kept':>12}  coupled inputs")
            lines += [f"  {p.path:<28} {p.capture:<12} {p.calls:>5} {p.params_after / max(p.params_before, 1):>12.1%}  "
                      f"{p.coupled_inputs}" for p in self.parts]
        lines.append(f"  {'group':>5} {'kept/total':>12} {'score kept':>11}  first member")
        for g in self.groups:
            share = g.kept_score / g.total_score if g.total_score else 1.0
            lines.append(f"  {g.id:>5} {g.kept:>5}/{g.total:<6} {share:>10.1%}  {g.first_member}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of ``dataclasses.asdict`` (how ``fxprune.save`` stores a report)."""
        return cls(**{**data, "groups": [GroupReport(**g) for g in data["groups"]],
                      "parts": [PartReport(**p) for p in data.get("parts", [])]})

    def _latency_lines(self) -> list[str]:
        """Predicted and measured latency side by side, with the share kept and the prediction's error."""
        predicted = f"predicted ({self.latency_prediction})"
        rows = [(name, before, after) for name, before, after in (
            ("tables alone", self.predicted_latency_ms_before,
             self.predicted_latency_ms_tables_after if self.latency_prediction != "tables" else None),
            (predicted, self.predicted_latency_ms_before, self.predicted_latency_ms_after),
            ("measured", self.measured_latency_ms_before, self.measured_latency_ms_after))
            if before is not None and after is not None]
        if not rows:
            return []
        lines = [f"  latency on {self.engine}    {'before':>10} {'after':>10} {'after/before':>13}"]
        lines += [f"    {name:<21}{before:>8.3f} ms{after:>8.3f} ms{after / before:>13.3f}" for name, before, after in rows]
        if self.measured_latency_ms_after is not None and self.predicted_latency_ms_after is not None:
            error = (self.predicted_latency_ms_after - self.measured_latency_ms_after) / self.measured_latency_ms_after
            ratio_error = ((self.predicted_latency_ms_after / self.predicted_latency_ms_before)
                           / (self.measured_latency_ms_after / self.measured_latency_ms_before) - 1)
            lines.append(f"    prediction error: {error:+.1%} in ms, {ratio_error:+.1%} in after/before")
        elif self.predicted_latency_ms_after is not None:
            lines.append("    measured: pass measure=True to fxprune.compile")
        return lines

    def _metric_name(self) -> str:
        return self.budget.split("(")[0].lower()
