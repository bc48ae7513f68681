"""Score pass: one importance value per group channel, for the solver to keep the best top-k.

Criteria (SP-LAMP, arXiv 2305.14403; LAMP, ICLR 2021; HALP, NeurIPS 2022; docs/architecture.md):

- ``sp_lamp``: SP-LAMP. Within each layer that produces the group's channels, a filter's (a row's) energy
  is its squared L2 norm; sorted ascending, score(u) = e_u / sum_{v >= u} e_v, so every layer's strongest
  filter scores exactly 1. A channel of several rows (an attention head) sums its rows' scores, and
  coupled layers' scores are summed per channel.
- ``lamp``: LAMP on individual weights (w^2 / sum of the larger-or-equal w^2 in the layer), summed
  over each filter's weights.
- ``l1`` / ``l2``: the filter's L1 norm / L2 norm, summed over the group's producing layers.
- ``bn_scale``: |gamma| of the group's per-channel normalizations, summed; groups without one use l2.
- ``taylor``: HALP's. |sum over the group's norms of gamma * dL/dgamma + beta * dL/dbeta| (or
  |sum W * dL/dW| over the filters where the group has no norm), per calibration batch, averaged.

Results: ``gm.meta["fxprune_importance"]`` (``Importance``: the criterion and one score per group
channel) and, on each producing layer, ``node.meta["fxprune_scores"]`` (its per-channel contribution).
Which tensor holds a layer's filters, and which a norm's scale, is each op's rule's to say.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import AnalysisRequiredError, ScoreError
from fxprune.ir import graph
from fxprune.ir.channels import ChannelSpace, Importance
from fxprune.ir.graph import inference
from fxprune.ir.keys import ANALYSIS_KEY, IMPORTANCE_KEY, SCORES_KEY
from fxprune.rules import RULES

CRITERIA = ("sp_lamp", "lamp", "l1", "l2", "bn_scale", "taylor")


def filters(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, ChannelSpace, str, Callable]]:
    """Every (node, output space, weight name, rows) that produces channels: ``rows(t)`` lays a tensor of
    the weight's shape (the weight or its gradient) out as one row per output position."""
    found = []
    for node in gm.graph.nodes:
        space = graph.space(node)
        if space is None:
            continue
        producer = _producer(gm, node, space)
        if producer is not None:
            found.append((node, space, *producer))
    return found


def _producer(gm: torch.fx.GraphModule, node: torch.fx.Node, space: ChannelSpace):
    """The tensor whose rows are this node's output channels (by qualified name), and its row layout."""
    if node.op == "get_attr":
        tensor = graph.attribute(gm, graph.target_name(node))
        if space.dim == 0 and isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
            return node.target, lambda w: w.reshape(w.shape[0], -1)
        return None
    rule = RULES.recorded(node)
    return rule.importance_rows(gm, node) if rule else None


def _add_per_channel(totals: dict[int, np.ndarray], space: ChannelSpace, values: torch.Tensor) -> np.ndarray:
    """Add one member's per-position values into its group's per-channel totals; returns the addition."""
    contribution = _per_channel(values.detach().double().numpy(), space, totals[space.group_id].size)
    totals[space.group_id] += contribution
    return contribution


def _per_channel(values: np.ndarray, space: ChannelSpace, size: int) -> np.ndarray:
    """Sum per-position values into the group's channels (a channel may span several positions)."""
    return np.bincount(space.group_channels, weights=values, minlength=size)


def lamp_scores(energies: np.ndarray) -> np.ndarray:
    """LAMP: e_u / sum_{v >= u} e_v in ascending order; the largest scores 1 (ties broken stably)."""
    order = np.argsort(energies, kind="stable")
    sorted_energy = energies[order]
    tail = np.cumsum(sorted_energy[::-1])[::-1]
    scores_sorted = np.divide(sorted_energy, tail, out=np.zeros_like(sorted_energy), where=tail > 0)
    scores_sorted[-1] = 1.0
    scores = np.empty_like(scores_sorted)
    scores[order] = scores_sorted
    return scores


def _filter_scores(weight: np.ndarray, space: ChannelSpace, size: int, criterion: str) -> np.ndarray:
    """One layer's contribution to its group's channel scores."""
    if criterion == "l1":
        return _per_channel(np.abs(weight).sum(1), space, size)
    energy = _per_channel((weight ** 2).sum(1), space, size)
    if criterion == "l2":
        return np.sqrt(energy)
    if criterion == "sp_lamp":  # the paper's unit is the filter: a channel of several rows sums their scores
        return _per_channel(lamp_scores((weight ** 2).sum(1)), space, size)
    if criterion == "lamp":
        flat = (weight ** 2).reshape(-1)
        per_weight = lamp_scores(flat).reshape(weight.shape)
        return _per_channel(per_weight.sum(1), space, size)
    raise ScoreError(f"unknown criterion {criterion!r}")


def _norm_members(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, ChannelSpace, str, str | None]]:
    """Every normalization with a per-channel scale: (node, space, scale name, shift name or None)."""
    found: list[tuple[torch.fx.Node, ChannelSpace, str, str | None]] = []
    for node in gm.graph.nodes:
        space, rule = graph.space(node), RULES.recorded(node)
        affine = rule.affine(gm, node) if rule and space is not None else None
        if affine is not None and affine[0] is not None and space is not None:
            found.append((node, space, affine[0], affine[1]))
    return found


def _magnitude_scores(gm: torch.fx.GraphModule, criterion: str) -> dict[int, np.ndarray]:
    analysis = gm.meta[ANALYSIS_KEY]
    totals = {gid: np.zeros(g.size) for gid, g in analysis.groups.items()}
    weight_criterion = "l2" if criterion == "bn_scale" else criterion
    with_norm: set[int] = set()
    if criterion == "bn_scale":
        for node, space, scale, _ in _norm_members(gm):
            _record(node, _add_per_channel(totals, space, graph.attribute(gm, scale).abs()))
            with_norm.add(space.group_id)
    for node, space, weight, rows in filters(gm):
        if space.group_id in with_norm:
            continue
        contribution = _filter_scores(rows(graph.attribute(gm, weight)).detach().double().numpy(), space,
                                      analysis.groups[space.group_id].size, weight_criterion)
        totals[space.group_id] += contribution
        _record(node, contribution)
    return totals


def _record(node: torch.fx.Node, contribution: np.ndarray) -> None:
    previous = node.meta.get(SCORES_KEY)
    node.meta[SCORES_KEY] = contribution if previous is None else previous + contribution


class TaylorAccumulator:
    """HALP's first-order Taylor importance, summed over backward passes: per pass, per group channel,
    |sum over the group's norms of gamma * dL/dgamma + beta * dL/dbeta|, or |sum W * dL/dW| over the
    filters of groups without a norm.

    ``source`` maps a qualified parameter name to the tensor whose value and ``.grad`` are read: fxprune's
    own copy by default, or the user's live model during training (``fxprune.Pruner``).
    """

    def __init__(self, gm: torch.fx.GraphModule, source: Callable[[str], torch.Tensor] | None = None) -> None:
        self.groups = gm.meta[ANALYSIS_KEY].groups
        parameters = dict(gm.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
        source = source or parameters.__getitem__
        norms = [entry for entry in _norm_members(gm) if entry[2] in parameters]
        norm_groups = {space.group_id for _, space, _, _ in norms}
        self.norms = [(space, source(scale), source(shift) if shift in parameters else None)
                      for _, space, scale, shift in norms]
        self.filters = [(space, source(weight), rows) for _, space, weight, rows in filters(gm)
                        if space.group_id not in norm_groups and weight in parameters]
        self.totals = {gid: np.zeros(g.size) for gid, g in self.groups.items()}
        self.count = 0

    @torch.no_grad()
    def add(self) -> None:
        """Read the gradients of one backward pass."""
        per_pass = {gid: np.zeros(g.size) for gid, g in self.groups.items()}
        for space, weight, bias in self.norms:
            if weight.grad is None:
                continue
            term = weight * weight.grad
            if bias is not None and bias.grad is not None:
                term = term + bias * bias.grad
            _add_per_channel(per_pass, space, term)
        for space, weight, rows in self.filters:
            if weight.grad is not None:
                _add_per_channel(per_pass, space, rows(weight * weight.grad).sum(1))
        for gid in self.totals:
            self.totals[gid] += np.abs(per_pass[gid])
        self.count += 1

    def mean(self) -> dict[int, np.ndarray]:
        """The importance averaged over the passes read so far."""
        return {gid: total / max(self.count, 1) for gid, total in self.totals.items()}

    def reset(self) -> None:
        for total in self.totals.values():
            total[:] = 0.0
        self.count = 0


def taylor_scores(gm: torch.fx.GraphModule, calibration: Iterable[Any],
                  loss_fn: Callable[[Any, Any], torch.Tensor]) -> dict[int, np.ndarray]:
    """HALP's first-order Taylor importance, averaged over calibration batches.

    Each batch is ``(inputs, target)`` where ``inputs`` is a tensor or tuple of tensors;
    ``loss_fn(outputs, target)`` returns a scalar. Gradients are taken on fxprune's own copy, run in eval
    mode (``ir.graph.inference``): no BatchNorm statistic moves, whatever mode the model was in.
    """
    accumulator = TaylorAccumulator(gm)
    params = [p for p in gm.parameters()]
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in calibration:
            with inference(gm, grad=True):
                _backward(gm, batch, loss_fn)
            accumulator.add()
    finally:
        gm.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    if accumulator.count == 0:
        raise ScoreError("importance='taylor' needs calibration batches: pass calibration=[(inputs, target), "
                         "...] and loss_fn=lambda outputs, target: ...")
    return accumulator.mean()


def _backward(gm: torch.fx.GraphModule, batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
    """Gradients of one calibration batch's loss, in place of the previous batch's."""
    inputs, target = batch
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    gm.zero_grad(set_to_none=True)
    loss = loss_fn(gm(*inputs), target)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ScoreError("loss_fn must return a scalar tensor")
    loss.backward()


class ScorePass(PassBase):
    """Compute group-channel importance with one criterion (``gm.meta["fxprune_importance"]``)."""

    def __init__(self, criterion: str = "sp_lamp", calibration: Iterable[Any] | None = None,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ScoreError(f"unknown importance criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if criterion == "taylor" and (calibration is None or loss_fn is None):
            raise ScoreError("importance='taylor' needs data: pass calibration=[(inputs, target), ...] and "
                             "loss_fn=lambda outputs, target: scalar loss")
        self.criterion, self.calibration, self.loss_fn = criterion, calibration, loss_fn

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:
            raise AnalysisRequiredError("scoring needs channel groups: run fxprune.analyze(model, inputs) first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        for node in graph_module.graph.nodes:
            node.meta.pop(SCORES_KEY, None)
        if self.criterion == "taylor":
            assert self.calibration is not None and self.loss_fn is not None  # __init__ checks
            scores = taylor_scores(graph_module, self.calibration, self.loss_fn)
        else:
            with torch.no_grad():
                scores = _magnitude_scores(graph_module, self.criterion)
        graph_module.meta[IMPORTANCE_KEY] = Importance(self.criterion, scores)
        return PassResult(graph_module, modified=False)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        scores, groups = graph_module.meta[IMPORTANCE_KEY].scores, graph_module.meta[ANALYSIS_KEY].groups
        assert all(scores[gid].shape == (group.size,) for gid, group in groups.items())
