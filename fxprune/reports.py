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
    budget_share: float | None = None  # a latency budget as a share of the unpruned model (the whole one, in parts)
    plan_timed_now: bool = False  # the closed loop's timing of the returned plan was taken in this run
    machine_busy: bool = False  # the latency pass or the closed loop found the machine busy in this run
    fp32_latency_ms_before: float | None = None  # an INT8 engine's compile, measured: the FP32 models too
    fp32_latency_ms_after: float | None = None
    prefill_share: float | None = None  # a decoder's both-phase budget: its prefill timed against the model's
    notes: list[str] = field(default_factory=list)
    parts: list[PartReport] = field(default_factory=list)  # a partitioned model: each part captured alone
    returned: str = "GraphModule"  # the class of what compile returned: the user's own, or the pruned graph
    shapes_checked: list[str] = field(default_factory=list)  # input shapes the returned model was verified at
    blocks_removed: list[str] = field(default_factory=list)  # modules of the residual blocks the plan removed

    def __str__(self) -> str:
        lines = [f"fxprune.compile: budget {self.budget}, importance {self.importance}, solver {self.solver} "
                 f"({self.solver_seconds * 1e3:.0f} ms, {self.iterations} solves), captured by {self.capture}"]
        if self.budget_share is None:
            lines.append(f"  predicted {self._metric_name()}: {self.predicted_before:.4g} -> "
                         f"{self.predicted_after:.4g} (budget {self.capacity:.4g})")
        lines += [f"  FLOPs:  {self.flops_before:,} -> {self.flops_after:,} "
                 f"({self.flops_after / max(self.flops_before, 1):.1%})",
                 f"  params: {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / max(self.params_before, 1):.1%})"]
        lines += self._latency_lines()
        if self.shapes_checked:
            lines.append(f"  returned: {self.returned}, verified at {'; '.join(self.shapes_checked)}")
        if self.blocks_removed:
            lines.append(f"  blocks removed ({len(self.blocks_removed)}): {', '.join(self.blocks_removed)}")
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

    @property
    def measured_share(self) -> float | None:
        """The returned model's latency over the unpruned one's, timed after compiling (measure=True)."""
        if self.measured_latency_ms_before is None or self.measured_latency_ms_after is None:
            return None
        return self.measured_latency_ms_after / self.measured_latency_ms_before

    @property
    def over_budget(self) -> float | None:
        """The returned plan's latency share where its best figure (measured after compiling, else the
        closed loop's) is over the user's latency budget at the precision the report prints (0.5004 reads
        0.500, not over 0.500); else None."""
        if self.budget_share is None:
            return None
        share = self.measured_share
        if share is None and self.predicted_latency_ms_before:
            assert self.predicted_latency_ms_after is not None  # set with predicted_latency_ms_before
            share = self.predicted_latency_ms_after / self.predicted_latency_ms_before
        return share if share is not None and round(share, 3) > round(self.budget_share, 3) else None

    def note_over_budget(self) -> None:
        """A note, saying what to do, only where the returned model's latency is over the user's budget."""
        share = self.over_budget
        if share is None:
            return
        measured = self.measured_share is not None
        if measured and self.machine_busy:
            advice = ("the machine was busy in this run (a contended machine slows a small model more than a large "
                      "one): time it again on a quiet machine")
        else:
            advice = (("one model timed twice on a shared machine moves by a few percent; " if measured else
                       "no plan the closed loop timed fit the budget; ")
                      + "compile with a larger refine, or ask for a little less than the budget")
        self.notes.append(f"the returned model {'measured' if measured else 'is predicted at'} {share:.3f} of the "
                          f"unpruned model, over the budget {self.budget_share:.3f}: {advice}")

    def _latency_lines(self) -> list[str]:
        """Latency in one vocabulary: shares of the unpruned model; milliseconds only as timed in this run."""
        if self.budget_share is None and self.measured_share is None:
            return []
        parts = " (the captured parts)" if self.parts else ""
        before = self.measured_latency_ms_before or self.predicted_latency_ms_before
        lines = [f"  latency on {self.engine}, as a share of the unpruned model ({before:.3f} ms, timed in this run):"]
        rows = []
        if self.budget_share is not None:
            rows.append(("budget", self.budget_share, ""))
        if self.predicted_latency_ms_before:
            assert self.predicted_latency_ms_after is not None  # set with predicted_latency_ms_before
            tables = self.predicted_latency_ms_tables_after or self.predicted_latency_ms_after
            rows.append((f"tables' prediction{parts}", tables / self.predicted_latency_ms_before, ""))
            closed = self.predicted_latency_ms_after / self.predicted_latency_ms_before
            plans = sum(source == "plan" for _, _, source in self.latency_points)
            timed = f"{plans} plan{'s' if plans != 1 else ''} timed while solving"
            if self.latency_prediction == "measured":
                when = "in this run" if self.plan_timed_now else "in an earlier run (cache)"
                rows.append((f"closed loop{parts}", closed, f"this plan timed {when}; {timed}"))
            elif self.latency_prediction == "corrected":
                rows.append((f"closed loop{parts}", closed, f"the tables corrected: {timed}"))
        if self.measured_share is not None:
            rows.append(("measured after compiling", self.measured_share,
                         f"{self.measured_latency_ms_after:.3f} ms, timed in this run"))
        if self.prefill_share is not None:
            rows.append(("prefill of the example (both phases)", self.prefill_share, "timed after the decode solve"))
        if self.fp32_latency_ms_before and self.fp32_latency_ms_after is not None:
            rows.append(("the FP32 models on onnxruntime", self.fp32_latency_ms_after / self.fp32_latency_ms_before,
                         f"{self.fp32_latency_ms_before:.3f} -> {self.fp32_latency_ms_after:.3f} ms, timed in this "
                         "run"))
        lines += [f"    {name:<40}{share:>7.3f}" + (f"   ({why})" if why else "") for name, share, why in rows]
        if self.measured_share is not None and self.predicted_latency_ms_before and not self.parts:
            assert self.predicted_latency_ms_after is not None  # set with predicted_latency_ms_before
            tables = ((self.predicted_latency_ms_tables_after or self.predicted_latency_ms_after)
                      / self.predicted_latency_ms_before)
            lines.append(f"    tables' prediction error: {tables / self.measured_share - 1:+.1%} of the measured share")
        elif self.measured_share is None and self.predicted_latency_ms_before:
            lines.append("    measured after compiling: pass measure=True to fxprune.compile")
        return lines

    def _metric_name(self) -> str:
        return self.budget.split("(")[0].lower()
