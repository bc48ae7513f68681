"""Whole-model budget pass: a model captured in parts is pruned to a budget over its whole forward.

Its budget is translated to the captured parts (``parts_budget``): the whole model's FLOPs, parameters or
end-to-end latency on the engine, minus what the uncaptured code (post-processing, what no front end
captured) costs, which does not shrink. Writes ``gm.meta["fxprune_whole"]`` (``ir.whole.WholeModel``),
which the plan pass solves for and the report reads; a no-op on a graph captured whole.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.budgets import Budget, Latency
from fxprune.errors import AnalysisRequiredError
from fxprune.ir.capture import is_partitioned
from fxprune.ir.keys import COST_KEY, WHOLE_KEY
from fxprune.ir.whole import WholeModel
from fxprune.passes.budget import parts_budget
from fxprune.passes.context import Context
from fxprune.passes.cost import count_flops, count_params


class WholeModelBudgetPass(PassBase):
    """The parts' budget of a partitioned ``gm``, from ``budget`` over ``model`` called on ``args``/``kwargs``."""

    def __init__(self, context: Context, budget: Budget, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.context, self.budget, self.model, self.args, self.kwargs = context, budget, model, args, kwargs

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if is_partitioned(graph_module) and COST_KEY not in graph_module.meta:
            raise AnalysisRequiredError("the whole-model budget compares the parts' cost with the model's: run the "
                                        "cost pass first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        if not is_partitioned(graph_module):
            return PassResult(graph_module, modified=False)
        flops, params = count_flops(self.model, self.args, self.kwargs), count_params(self.model)
        if self.budget.metric != "latency":
            whole = flops if self.budget.metric == "flops" else params
            parts = graph_module.meta[COST_KEY][self.budget.metric].baseline
            graph_module.meta[WHOLE_KEY] = WholeModel(parts_budget(self.budget, parts, whole),
                                                      min(parts / whole, 1.0), flops, params)
            return PassResult(graph_module, modified=False)
        # end to end on the engine: the whole model exported as it runs, against its captured parts alone
        context = self.context
        whole_ms, (share,) = context.timing_engine().time_shares(context.deploy(self.model, self.args).run,
                                                                 [context.deployed(graph_module).run])
        share = min(share, 1.0)
        amount = parts_budget(self.budget, share * whole_ms, whole_ms, " ms")
        graph_module.meta[WHOLE_KEY] = WholeModel(Latency(amount.value / (share * whole_ms)), share, flops, params,
                                                  self.budget.share(whole_ms), share)
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        assert not is_partitioned(graph_module) or isinstance(graph_module.meta[WHOLE_KEY], WholeModel)
