"""Cost pass: FLOPs and parameter counts of the model as functions of the kept channels.

Every cost is a sum of terms ``full * prod(kept_s / size_s)`` over the channel spaces ``s`` that scale
it. For parameters, ``full`` is a tensor's element count and the spaces are the axes the rewrite indexes
(``rules/params.py``), which makes the count exact. For FLOPs, ``full`` is the node's count at full width
by ``FlopCounterMode``; a rule with bilinear FLOPs (convolutions, linear layers) scales with its weight's
input and output widths (exact), and a rule with a FLOP probe (attention) is fitted as a bilinear
function of its widths from four counted evaluations (exact: its projections are linear in them).

There is one FLOP count: ``count_flops``, which the cost pass, the budget's baseline and the report all
use. It runs the model as ``ir.graph.inference`` does, with torch's fused ``nn.MultiheadAttention`` fast
path off: that kernel is invisible to FlopCounterMode, and the pruned model's attention is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import AnalysisRequiredError
from fxprune.ir import graph
from fxprune.ir.capture import PART_KEY, capture_of
from fxprune.ir.cost import CostModel, CostTerm
from fxprune.ir.graph import inference
from fxprune.ir.keys import ANALYSIS_KEY, COST_KEY
from fxprune.passes.blocks import block_spaces
from fxprune.rules import RULES, input_space
from fxprune.rules.params import parameter_axes


@contextmanager
def countable(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as fxprune counts its FLOPs (see the module docstring): ``inference``, fast path off."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with inference(module):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def count_flops(module: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> int:
    """FLOPs of one forward pass (the count the budget, the solver and the report share)."""
    with countable(module), FlopCounterMode(display=False) as counter:
        module(*example_inputs, **(example_kwargs or {}))
    return counter.get_total_flops()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _scaling(gm: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """Per parameter (qualified name): the spaces that scale it, the ones it reads first, then the ones it
    produces (the planner charges a term to its last space: the output side)."""
    axes: dict[str, list] = {}
    for axis in parameter_axes(gm):
        axes.setdefault(axis.name, []).append(axis)
    return {name: tuple(dict.fromkeys([a.space.id for a in entries if not a.produces] +
                                      [a.space.id for a in entries if a.produces]))
            for name, entries in axes.items()}


def param_cost(gm: torch.fx.GraphModule, scaling: dict[str, tuple[int, ...]] | None = None) -> CostModel:
    """Exact parameter count as a function of kept widths (``scaling``: ``_scaling(gm)``, if made already)."""
    scaling = _scaling(gm) if scaling is None else scaling
    _, blocks = block_spaces(gm)
    model = CostModel("params")
    for name, param in gm.named_parameters():  # shared parameters are listed once
        block = (blocks[name],) if name in blocks else ()
        model.terms.append(CostTerm(name, float(param.numel()), block + scaling.get(name, ())))
    model.baseline = model.total({})
    return model


class _FlopInterpreter(torch.fx.Interpreter):
    """Runs the graph once, counting each node's FLOPs separately."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[torch.fx.Node, int] = {}
        self.terms: list[CostTerm] = []
        capture = capture_of(gm)  # in a graph captured in parts, a part the forward calls n times costs n times
        self.calls = {part.path: part.calls for part in capture.parts} if capture is not None else {}
        self.blocks, _ = block_spaces(gm)

    def block(self, n: torch.fx.Node) -> tuple[int, ...]:
        """The space of the removable block ``n`` is in, if any: its costs go with the block."""
        return (self.blocks[n.name],) if n.name in self.blocks else ()

    def _calls(self, n: torch.fx.Node) -> int:
        part = n.meta.get(PART_KEY)
        return self.calls.get(part, 1) if part is not None else 1

    def run_node(self, n: torch.fx.Node):
        rule = RULES.recorded(n)
        if rule is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            probe = rule.flop_probe(self.module, n, args, kwargs)
            if probe is not None:
                self._fit_bilinear(n, probe)
                return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        if counter.get_total_flops():
            self.flops[n] = counter.get_total_flops() * self._calls(n)
        return result

    def _fit_bilinear(self, n: torch.fx.Node, probe: Callable[[int, int], Callable[[], Any]]) -> None:
        """FLOPs = a + b*in + c*out + d*in*out from counts at full and half widths."""

        def count(kin: int, kout: int) -> int:
            with FlopCounterMode(display=False) as counter:
                probe(kin, kout)()
            return counter.get_total_flops() * self._calls(n)

        in_space, out_space = input_space(n), graph.space(n)
        assert out_space is not None  # flop_probe gives a probe where the node's output has a space
        width_in = in_space.size if in_space is not None else None
        width_out = out_space.size
        half_in = max(1, width_in // 2) if width_in else None
        half_out = max(1, width_out // 2)
        if width_in is None or half_in == width_in or half_out == width_out:
            self.flops[n] = count(width_in or graph.tensor_shape(n.args[0])[-1], width_out)
            return
        assert in_space is not None and half_in is not None  # width_in is in_space's, and at least 2
        f = {(i, o): count(i, o) for i in (width_in, half_in) for o in (width_out, half_out)}
        d = (f[width_in, width_out] - f[half_in, width_out] - f[width_in, half_out] + f[half_in, half_out]) \
            / ((width_in - half_in) * (width_out - half_out))
        b = (f[width_in, half_out] - f[half_in, half_out]) / (width_in - half_in) - d * half_out
        c = (f[half_in, width_out] - f[half_in, half_out]) / (width_out - half_out) - d * half_in
        a = f[half_in, half_out] - b * half_in - c * half_out - d * half_in * half_out
        name, block = n.name, self.block(n)
        self.terms += [CostTerm(f"{name} (fixed)", a, block),
                       CostTerm(f"{name} (input width)", b * width_in, block + (in_space.id,)),
                       CostTerm(f"{name} (output width)", c * width_out, block + (out_space.id,)),
                       CostTerm(f"{name} (input x output)", d * width_in * width_out,
                                block + (in_space.id, out_space.id))]


def flop_cost(gm: torch.fx.GraphModule, example_inputs: tuple,
              scaling: dict[str, tuple[int, ...]] | None = None) -> CostModel:
    """FLOPs as a function of kept widths, from one counted forward pass at full width."""
    counter = _FlopInterpreter(gm)
    with countable(gm):  # each node is counted by a counter of its own
        counter.run(*example_inputs)
    scaling = _scaling(gm) if scaling is None else scaling
    model = CostModel("flops", terms=list(counter.terms))
    for node, flops in counter.flops.items():
        spaces: tuple[int, ...] = ()
        rule = RULES.recorded(node)
        if rule is not None and rule.bilinear_flops:
            weight = next((axis.name for axis in rule.tensor_axes(gm, node)), None)
            spaces = scaling.get(weight, ()) if weight is not None else ()
        model.terms.append(CostTerm(node.name, float(flops), counter.block(node) + spaces))
    model.baseline = model.total({})
    return model


class CostPass(PassBase):
    """Attach FLOPs and parameter cost models to an analysed graph (``gm.meta["fxprune_cost"]``)."""

    def __init__(self, example_inputs: tuple) -> None:
        super().__init__()
        self.example_inputs = example_inputs

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:
            raise AnalysisRequiredError("costs need channel groups: run fxprune.analyze(model, inputs) first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        scaling = _scaling(graph_module)
        graph_module.meta[COST_KEY] = {
            "flops": flop_cost(graph_module, self.example_inputs, scaling),
            "params": param_cost(graph_module, scaling),
        }
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        costs = graph_module.meta[COST_KEY]
        assert {"flops", "params"} <= set(costs) and all(cost.baseline >= 0 for cost in costs.values())
