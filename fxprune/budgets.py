"""Budgets: what the pruned model must fit in. A plain float is a share of the baseline latency."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fxprune.errors import BudgetError


def _check_fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{what} must be a number in (0, 1], got {type(value).__name__}")
    if not 0 < value <= 1:
        raise BudgetError(f"{what} must be in (0, 1] (a share of the unpruned model), got {value}; "
                          "e.g. 0.5 keeps half")
    return float(value)


PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class Latency:
    """A latency budget: a share of the baseline latency on the engine, or absolute milliseconds.

    ``phase`` (Hugging Face decoders): ``"decode"``, the latency of one generated token given a key-value cache
    of ``tokens`` past tokens (default: the example's length) at ``batch`` (default: the example's);
    ``"prefill"``, a forward over the example; ``"both"``, the larger share of the two (a decoder's default,
    ``None``: any other model has one phase, its forward)."""

    fraction: float | None = None
    ms: float | None = None
    phase: str | None = None
    tokens: int | None = None
    batch: int | None = None
    metric = "latency"

    def __post_init__(self) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise BudgetError(f"Latency(phase={self.phase!r}): a decoder's latency is 'prefill' (one forward of the "
                              "example's tokens), 'decode' (one token with a key-value cache) or 'both' (the "
                              "larger share of the two: a decoder's default)")
        for name in ("tokens", "batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BudgetError(f"Latency({name}={value!r}) must be a positive whole number")
            if value is not None and self.phase == "prefill":
                raise BudgetError(f"Latency({name}=...) sets the decode step: give it with phase='decode' or "
                                  "'both'")
        if (self.fraction is None) == (self.ms is None):
            raise BudgetError("give Latency exactly one of a fraction (Latency(0.5)) or milliseconds "
                              "(Latency(ms=4.0))")
        if self.fraction is not None:
            _check_fraction(self.fraction, "Latency fraction")
        elif isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not self.ms > 0:
            raise BudgetError(f"Latency(ms=...) must be a positive number of milliseconds, got {self.ms!r}")

    def capacity(self, baseline: float) -> float:
        return baseline * self.fraction if self.fraction is not None else self._ms()

    def of_phase(self, phase: str) -> "Latency":
        """This budget for one phase (a decode step keeps ``tokens`` and ``batch``)."""
        if phase == "decode":
            return replace(self, phase=phase)
        return replace(self, phase=phase, tokens=None, batch=None)

    def share(self, baseline: float) -> float:
        """The budget as a share of ``baseline``: the fraction given, exactly, where one was."""
        return self.fraction if self.fraction is not None else self._ms() / baseline

    def _ms(self) -> float:
        """``ms`` as a float, for a budget given in milliseconds (``__post_init__``: no fraction, then ms)."""
        assert self.ms is not None
        return float(self.ms)

    def __str__(self) -> str:
        value = f"{self.fraction}" if self.fraction is not None else f"ms={self.ms}"
        if self.phase is not None:
            value += f", phase={self.phase!r}" + "".join(f", {n}={getattr(self, n)}" for n in ("tokens", "batch")
                                                         if getattr(self, n) is not None)
        return f"Latency({value})"


@dataclass(frozen=True)
class _ShareOfModel:
    """A budget given as a share of the unpruned model's figure."""

    fraction: float
    metric = ""

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, f"{type(self).__name__} fraction")

    def capacity(self, baseline: float) -> float:
        return baseline * self.fraction

    def share(self, baseline: float) -> float:
        """The budget as a share of ``baseline``: the fraction given."""
        return self.fraction

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.fraction})"


class FLOPs(_ShareOfModel):
    """A FLOPs budget: a share of the model's FLOPs as FlopCounterMode counts them."""

    metric = "flops"


class Params(_ShareOfModel):
    """A parameter-count budget: a share of the model's parameters."""

    metric = "params"


@dataclass(frozen=True)
class Amount:
    """A budget in the metric's own units (FLOPs, parameters, ms): what the captured parts of a model may
    cost when the rest of it can't shrink (``passes/budget.py``'s ``parts_budget``)."""

    metric: str
    value: float

    def capacity(self, baseline: float) -> float:
        return self.value

    def share(self, baseline: float) -> float:
        """The amount as a share of ``baseline``."""
        return self.value / baseline

    def __str__(self) -> str:
        return f"{self.metric} <= {self.value:.6g}"


UserBudget = Latency | FLOPs | Params
"""A budget a user gives (``compile``, ``Pruner``, ``SSR``; a float becomes ``Latency(float)``)."""

Budget = UserBudget | Amount
"""Every budget the pipeline solves for: a user's, or the ``Amount`` a partitioned model's captured parts may
cost once the rest of the model is paid for (``passes/budget.py``'s ``parts_budget``)."""


def as_budget(budget: UserBudget | float) -> UserBudget:
    """Accept a user's budget or a float (a share of the baseline latency); anything else is a BudgetError."""
    if isinstance(budget, (Latency, FLOPs, Params)):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Latency(_check_fraction(budget, "budget"))
    raise BudgetError(f"budget must be a float in (0, 1] or fxprune.Latency/FLOPs/Params, got {budget!r}")
