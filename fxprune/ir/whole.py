"""What the whole-model budget pass leaves on a graph captured in parts (``gm.meta["fxprune_whole"]``): the
parts' budget, what share of the whole model they hold, and the whole model's own counts for the report."""

from __future__ import annotations

from dataclasses import dataclass

from fxprune.budgets import Budget
from fxprune.errors import BudgetError


@dataclass
class WholeModel:
    """A partitioned model's budget over its whole forward, translated to its captured parts."""

    budget: Budget  # the parts' budget: what the whole model's leaves them once the rest is paid for
    prunable: float  # the parts' share of the whole model in the budget's metric
    flops: int  # the unpruned model's FLOPs, whole forward
    params: int  # the unpruned model's parameters
    budget_share: float | None = None  # a latency budget as a share of the whole model
    prunable_latency: float | None = None  # the parts' share of the whole model's latency

    def unreachable(self, error: BudgetError, budget: Budget) -> BudgetError:
        """``error``, raised for the parts' budget, restated for the whole model: its smallest plan as a
        share of the whole model (what the parts' smallest plan leaves plus the rest, which stays)."""
        if error.smallest_share is None:
            return error
        smallest = 1 - self.prunable + self.prunable * error.smallest_share
        return BudgetError(
            f"the budget {budget} cannot be met: the smallest plan reaches {smallest:.3f} of the whole model "
            f"({self.prunable:.1%} of its {budget.metric} is in the parts fxprune captured and can prune, and "
            f"pruned to their smallest they keep {error.smallest_share:.3f} of it); {error.advice}",
            smallest_share=smallest, advice=error.advice)
