"""One compile makes its shared state once: the engine, the model digest, the deployed full model, and
each pruned copy (the plan the closed loop timed last is the module returned, not a second rewrite)."""

from __future__ import annotations

from collections import Counter

import torch

import fxprune
from fxprune.passes import context as context_module
from fxprune.passes.rewrite import RewritePass
from tests.doubles import CountingEngine, tiny_cnn

INPUTS = (torch.randn(1, 3, 32, 32),)



def test_a_latency_compile_computes_nothing_twice(tmp_path, monkeypatch):
    calls: Counter = Counter()
    pruned_plans: list[str] = []
    real_digest, real_engine, real_rewrite = (context_module.model_digest, context_module.get_engine,
                                              RewritePass.call)
    monkeypatch.setattr(context_module, "model_digest",
                        lambda *a: calls.update(["digest"]) or real_digest(*a))
    monkeypatch.setattr(context_module, "get_engine",
                        lambda *a, **k: calls.update(["engine"]) or real_engine(*a, **k))
    monkeypatch.setattr(RewritePass, "call",
                        lambda self, gm: pruned_plans.append(self.plan.to_json()) or real_rewrite(self, gm))
    engine = CountingEngine()
    pruned = fxprune.compile(tiny_cnn().eval(), fxprune.Latency(0.5), INPUTS, engine=engine, cache=tmp_path,
                             round_to=4, refine=2, progress=False)
    report = fxprune.report(pruned)
    assert calls == Counter({"digest": 1, "engine": 1})
    assert engine.traced_deployments == 1  # the latency pass's timing and the closed loop share it
    assert len(pruned_plans) == len(set(pruned_plans)) >= 2  # the reduced copy and a timed plan, once each
    assert fxprune.plan_of(pruned).to_json() in pruned_plans and report.latency_prediction == "measured"
