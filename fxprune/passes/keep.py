"""Keep pass: the channels the user asks to keep (``compile(..., keep=...)``) taken out of every plan.

A module named in ``keep`` (its qualified name, an ``fnmatch`` pattern of names, or its class; its
submodules too) keeps every channel it produces: each group a parameter of it produces channels of is
frozen, with the reason, and a removable block it is (or is inside) stays. Its input channels follow what
produces them (a layer reading a pruned stream reads fewer columns), as Torch-Pruning's ``ignored_layers`` do.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import KeepError
from fxprune.ir.channels import Analysis
from fxprune.ir.keys import ANALYSIS_KEY
from fxprune.passes.blocks import without_blocks
from fxprune.rules.params import parameter_axes


class KeepPass(PassBase):
    """Freezes the groups whose channels a kept module produces (``Analysis.groups[..].frozen_reason``)."""

    def __init__(self, keep: Iterable[str | type], model: nn.Module | None = None) -> None:
        super().__init__()
        self.keep, self.model = list(keep), model

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        if ANALYSIS_KEY not in graph_module.meta:
            raise KeepError("keep= applies to an analysed graph: run the dependency pass first")

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        if not self.keep:
            return PassResult(graph_module, modified=False)
        analysis: Analysis = graph_module.meta[ANALYSIS_KEY]
        matched: set[int] = set()
        for axis in parameter_axes(graph_module):
            module = axis.name.rpartition(".")[0]
            index = self._match(module)
            if index is None or not axis.produces:
                continue
            matched.add(index)
            group = analysis.groups[axis.space.group_id]
            if group.frozen_reason is None:
                group.frozen_reason = f"kept: {module} matches keep={self.keep[index]!r}"
        for nest in analysis.nests:  # query heads and their kv heads: one side kept keeps the other
            inner, outer = analysis.groups[nest.inner], analysis.groups[nest.outer]
            for kept, other in ((inner, outer), (outer, inner)):
                if kept.frozen_reason is not None and other.frozen_reason is None:
                    other.frozen_reason = f"{kept.frozen_reason} (query heads nested under kv heads)"
        reasons = {b.id: f"kept: {b.module} matches keep={self.keep[index]!r}" for b in analysis.blocks
                   if (index := self._match(b.module)) is not None}
        if reasons:  # a block with no prunable channels (frozen heads) is not kept by its groups
            without_blocks(graph_module, reasons)
        if unmatched := [self.keep[i] for i in range(len(self.keep)) if i not in matched]:
            raise KeepError(f"keep={unmatched!r} names no module whose parameters make channels in this model; "
                            "give qualified names as model.named_modules() lists them (patterns as in fnmatch: "
                            "'model.layers.*.self_attn'), or module classes")
        return PassResult(graph_module, modified=False)

    def _match(self, module: str) -> int | None:
        """The index of the first ``keep`` entry naming ``module`` or a module holding it, or None."""
        parents = [module.rsplit(".", depth)[0] for depth in range(module.count(".") + 1)]
        for index, wanted in enumerate(self.keep):
            if isinstance(wanted, str):
                if any(fnmatch.fnmatchcase(path, wanted) for path in parents):
                    return index
            elif self.model is not None and any(isinstance(self._module(path), wanted) for path in parents):
                return index
        return None

    def _module(self, path: str) -> nn.Module | None:
        assert self.model is not None  # classes are matched on the model they were given with
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None
