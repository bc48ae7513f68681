"""Cost pass: FLOPs and parameter counts of the model as functions of the kept channels.

Every cost is a sum of terms ``full * prod(kept_s / size_s)`` over the channel spaces ``s`` that scale
it. For parameters, ``full`` is a tensor's element count and the spaces are the dims the rewrite
indexes, which makes the count exact. For FLOPs, ``full`` is the node's count at full width, measured
by ``torch.utils.flop_counter.FlopCounterMode``; convolutions and linear layers scale with their input
and output widths (exact: their FLOPs are bilinear in them). Nodes whose FLOPs are not such a product
(attention kernels) are kept at their full count, an upper bound, so a plan that fits the model fits
the pruned network. ``measure_flops``/``count_params`` give the exact figures of any module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import AnalysisRequiredError
from fxprune.ir import META_KEY, LatencyTable, NodeChannels
from fxprune.modules import PrunedMultiheadAttention, shifted_window_attention
from fxprune.passes.params import input_space, module_axes
from fxprune.passes.trace import eval_mode

COST_KEY = "fxprune_cost"
PRUNABLE_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                    nn.PReLU, nn.MultiheadAttention)


@dataclass
class CostTerm:
    """One piece of a cost: ``full`` at full width, scaled by the kept share of ``spaces``."""

    what: str
    full: float
    spaces: tuple[int, ...] = ()

    def price(self, kept_share: Mapping[int, float | np.ndarray]) -> float | np.ndarray:
        """This term when space ``s`` keeps ``kept_share[s]`` of its positions (missing: all).

        Shares may be arrays (one entry per option of a group), which gives an array of prices.
        """
        value = self.full
        for s in self.spaces:
            value = value * kept_share.get(s, 1.0)
        return value


@dataclass
class TableTerm:
    """A layer's latency: its measured table looked up at the kept widths of its input and output."""

    what: str
    table: LatencyTable
    in_space: int | None  # None: the input width never changes
    out_space: int | None
    in_size: int
    out_size: int

    @property
    def spaces(self) -> tuple[int, ...]:
        return tuple(s for s in (self.in_space, self.out_space) if s is not None)

    @property
    def full(self) -> float:
        return self.table.at(self.in_size, self.out_size)

    def price(self, kept_share: Mapping[int, float | np.ndarray]) -> float | np.ndarray:
        width_in = self.in_size * kept_share.get(self.in_space, 1.0)
        width_out = self.out_size * kept_share.get(self.out_space, 1.0)
        return self.table.at(width_in, width_out)


Term = CostTerm | TableTerm


@dataclass
class CostModel:
    """A metric of the model as a function of each channel space's kept width."""

    metric: str
    terms: list[Term] = field(default_factory=list)
    baseline: float = 0.0

    def total(self, kept_share: Mapping[int, float]) -> float:
        """The metric when space ``s`` keeps ``kept_share[s]`` of its positions (missing: all)."""
        return float(sum(t.price(kept_share) for t in self.terms))


def _module_scaling(module: nn.Module, node: torch.fx.Node) -> dict[str, tuple[int, ...]] | None:
    """For a prunable module: which spaces scale each of its parameters (by attribute name), input first."""
    axes = module_axes(module, node)
    if not axes and not isinstance(module, PRUNABLE_MODULES):
        return None
    return {name: tuple(dict.fromkeys([s.id for _, s, produces in entries if not produces] +
                                      [s.id for _, s, produces in entries if produces]))
            for name, entries in axes.items()}


def param_cost(gm: torch.fx.GraphModule) -> CostModel:
    """Exact parameter count as a function of kept widths."""
    scaled: dict[int, tuple[str, tuple[int, ...]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            for name, spaces in (_module_scaling(module, node) or {}).items():
                param = _parameter_or_none(module, name)
                if param is not None:
                    scaled[id(param)] = (f"{node.target}.{name}", spaces)
        elif node.op == "get_attr":
            space = node.meta.get(META_KEY, NodeChannels()).space
            owner, _, name = node.target.rpartition(".")
            param = gm.get_submodule(owner)._parameters.get(name)
            if param is not None and space is not None:
                scaled[id(param)] = (node.target, (space.id,))
    model = CostModel("params")
    seen: set[int] = set()
    for name, param in gm.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        what, spaces = scaled.get(id(param), (name, ()))
        model.terms.append(CostTerm(what, float(param.numel()), spaces))
    model.baseline = model.total({})
    return model


def _parameter_or_none(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module.get_parameter(name)``, or None where the module has no such parameter (bias=False)."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def _count(fn, *args, **kwargs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


class _FlopInterpreter(torch.fx.Interpreter):
    """Runs the graph once, counting each node's FLOPs separately.

    Attention is counted as fxprune's kernels compute it after pruning (torch's fused eval-mode
    ``nn.MultiheadAttention`` is invisible to FlopCounterMode), as a bilinear function of the input and
    output widths fitted from four counted evaluations: exact, since the projections are linear in them.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[torch.fx.Node, int] = {}
        self.terms: list[CostTerm] = []

    def run_node(self, n: torch.fx.Node):
        probe = self._attention_probe(n)
        if probe is not None:
            self._fit_bilinear(n, probe)
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        if counter.get_total_flops():
            self.flops[n] = counter.get_total_flops()
        return result

    def _attention_probe(self, n: torch.fx.Node):
        """A function (kept_in, kept_out) -> FLOPs for attention nodes, else None."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), nn.MultiheadAttention):
            mha = self.module.get_submodule(n.target)
            if not mha._qkv_same_embed_dim or mha.bias_k is not None or not n.meta.get(META_KEY):
                return None
            x = args[0]

            def probe(kin: int, kout: int) -> int:
                module = PrunedMultiheadAttention.from_attention(mha, torch.arange(kin), torch.arange(kout))
                return _count(module, x[..., :kin])
            return probe
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "shifted_window_attention" \
                and n.meta.get(META_KEY) and n.meta[META_KEY].rewrite == "window_attention":
            x, qkv_weight, proj_weight, *rest = args

            def probe(kin: int, kout: int) -> int:
                return _count(shifted_window_attention, x[..., :kin], qkv_weight[:, :kin], proj_weight[:kout],
                              *rest, **{**kwargs, "proj_bias": None})
            return probe
        return None

    def _fit_bilinear(self, n: torch.fx.Node, probe) -> None:
        """FLOPs = a + b*in + c*out + d*in*out from counts at full and half widths."""
        in_space, out_space = input_space(n), n.meta[META_KEY].space
        width_in = in_space.size if in_space is not None else None
        width_out = out_space.size
        half_in = max(1, width_in // 2) if width_in else None
        half_out = max(1, width_out // 2)
        if width_in is None or half_in == width_in or half_out == width_out:
            self.flops[n] = probe(width_in or n.args[0].meta["tensor_meta"].shape[-1], width_out)
            return
        f = {(i, o): probe(i, o) for i in (width_in, half_in) for o in (width_out, half_out)}
        d = (f[width_in, width_out] - f[half_in, width_out] - f[width_in, half_out] + f[half_in, half_out]) \
            / ((width_in - half_in) * (width_out - half_out))
        b = (f[width_in, half_out] - f[half_in, half_out]) / (width_in - half_in) - d * half_out
        c = (f[half_in, width_out] - f[half_in, half_out]) / (width_out - half_out) - d * half_in
        a = f[half_in, half_out] - b * half_in - c * half_out - d * half_in * half_out
        name = n.name
        self.terms += [CostTerm(f"{name} (fixed)", a), CostTerm(f"{name} (input width)", b * width_in, (in_space.id,)),
                       CostTerm(f"{name} (output width)", c * width_out, (out_space.id,)),
                       CostTerm(f"{name} (input x output)", d * width_in * width_out, (in_space.id, out_space.id))]


def flop_cost(gm: torch.fx.GraphModule, example_inputs: tuple) -> CostModel:
    """FLOPs as a function of kept widths, from one counted forward pass at full width."""
    counter = _FlopInterpreter(gm)
    with torch.no_grad():
        counter.run(*example_inputs)
    model = CostModel("flops", terms=list(counter.terms))
    for node, flops in counter.flops.items():
        spaces: tuple[int, ...] = ()
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                spaces = _module_scaling(module, node).get("weight", ())
        model.terms.append(CostTerm(node.name, float(flops), spaces))
    model.baseline = model.total({})
    return model


def measure_flops(module: nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass, as FlopCounterMode counts them (in eval mode: no statistic moves)."""
    with torch.no_grad(), eval_mode(module), FlopCounterMode(display=False) as counter:
        module(*example_inputs)
    return counter.get_total_flops()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class CostPass(PassBase):
    """Attach FLOPs and parameter cost models to an analysed graph (``gm.meta["fxprune_cost"]``)."""

    def __init__(self, example_inputs: tuple) -> None:
        super().__init__()
        self.example_inputs = example_inputs

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if META_KEY not in graph_module.meta:
            raise AnalysisRequiredError("costs need channel groups: run fxprune.analyze(model, inputs) first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph_module.meta[COST_KEY] = {
            "flops": flop_cost(graph_module, self.example_inputs),
            "params": param_cost(graph_module),
        }
        return PassResult(graph_module, modified=False)
