"""The cost pass predicts exactly what FlopCounterMode and parameter counts measure after pruning."""

from __future__ import annotations

import numpy as np
import pytest

import fxprune
from fxprune.passes.cost import COST_KEY, CostPass, count_flops, count_params
from fxprune.testing import build_torchvision_model


def _kept_share(gm, plan):
    analysis = fxprune.analysis(gm)
    masks = {gid: np.ones(g.size, dtype=bool) for gid, g in analysis.groups.items()}
    for gid, kept in plan.keep.items():
        masks[gid][:] = False
        masks[gid][kept] = True
    return {s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in analysis.spaces}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
                                  "vit_b_32", "swin_t", "regnet_y_400mf"])
def test_predicted_flops_and_params_equal_measured(name):
    model, inputs = build_torchvision_model(name)
    gm = fxprune.analyze(model, inputs)
    CostPass(inputs)(gm)
    costs = gm.meta[COST_KEY]
    for seed in (0, 1):
        plan = fxprune.random_plan(gm, 0.4 + 0.2 * seed, seed=seed)
        pruned = fxprune.prune(gm, plan)
        share = _kept_share(gm, plan)
        assert round(costs["params"].total(share)) == count_params(pruned)
        assert costs["flops"].total(share) == pytest.approx(count_flops(pruned, inputs), rel=1e-9)
    assert costs["params"].baseline == count_params(model)
