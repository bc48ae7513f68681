"""fxprune: latency-aware structured channel pruning for PyTorch, as passes over one torch.fx graph."""

from fxprune.api import analysis, analyze, compile, groups, plan_of, prune, random_plan, report
from fxprune.budgets import FLOPs, Latency, Params
from fxprune.cache import LatencyCache
from fxprune.errors import (
    AnalysisRequiredError,
    BudgetError,
    EngineUnavailableError,
    ExampleInputsError,
    ExportError,
    FxpruneError,
    FxpruneTraceError,
    InvalidWeightsError,
    LatencyError,
    PlanError,
    UnsupportedModelError,
)
from fxprune.ir import ChannelGroup, ChannelSpace, GroupMember, LatencyTable, NodeChannels, Plan
from fxprune.pruner import Pruner
from fxprune.saving import load, save
from fxprune.ssr import SSR

__all__ = [
    "analysis", "analyze", "compile", "groups", "plan_of", "prune", "random_plan", "report", "export_onnx",
    "load", "save",
    "FLOPs", "Latency", "Params", "LatencyCache", "Pruner", "SSR",
    "AnalysisRequiredError", "BudgetError", "EngineUnavailableError", "ExampleInputsError", "ExportError",
    "FxpruneError", "FxpruneTraceError", "InvalidWeightsError", "LatencyError", "PlanError", "UnsupportedModelError",
    "ChannelGroup", "ChannelSpace", "GroupMember", "LatencyTable", "NodeChannels", "Plan",
]


def export_onnx(*args, **kwargs):
    """Export to ONNX, check, clean and verify in onnxruntime; see ``fxprune.passes.export.export_onnx``."""
    from fxprune.passes.export import export_onnx as _export_onnx  # onnx imports are slow; load on use

    return _export_onnx(*args, **kwargs)
