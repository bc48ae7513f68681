"""fxprune's IR: what passes leave on ``node.meta`` and ``gm.meta`` (keys in ``keys``), as dataclasses."""

from fxprune.ir.channels import (
    Analysis,
    ChannelGroup,
    ChannelSpace,
    GroupMember,
    Importance,
    Nest,
    NodeChannels,
    Plan,
)
from fxprune.ir.cost import CostModel, CostTerm, TableTerm
from fxprune.ir.keys import (
    ANALYSIS_KEY,
    CHANNELS_KEY,
    COST_KEY,
    IMPORTANCE_KEY,
    LATENCY_KEY,
    LAYER_LATENCY_KEY,
    META_KEY,
    PLAN_KEY,
    REPORT_KEY,
    SCORES_KEY,
    SOLUTION_KEY,
    VALUE_KEY,
)
from fxprune.ir.latency import LatencyCalibration, LatencyTable, LayerLatency
from fxprune.ir.solution import LatencyPoint, MeasuredSolve, PlanResult, Solution
from fxprune.ir.units import Activation, UnitSpec

__all__ = [
    "Analysis", "ChannelGroup", "ChannelSpace", "GroupMember", "Importance", "Nest", "NodeChannels", "Plan",
    "CostModel", "CostTerm", "TableTerm", "LatencyCalibration", "LatencyTable", "LayerLatency",
    "LatencyPoint", "MeasuredSolve", "PlanResult", "Solution", "Activation", "UnitSpec",
    "ANALYSIS_KEY", "CHANNELS_KEY", "COST_KEY", "IMPORTANCE_KEY", "LATENCY_KEY", "LAYER_LATENCY_KEY", "META_KEY",
    "PLAN_KEY", "REPORT_KEY", "SCORES_KEY", "SOLUTION_KEY", "VALUE_KEY",
]
