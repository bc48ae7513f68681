"""The latency pass: tables interpolate, units are found as engines fuse them, the cost model is exact
for an engine whose latency we know, the step is found, and on onnxruntime the predicted latency orders
plans as measuring them does."""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.backends import engines
from fxprune.backends.engines import KernelTime, quiet_ratios
from fxprune.cache import LatencyCache
from fxprune.ir import LatencyTable, Plan
from fxprune.ir.keys import LATENCY_KEY, LAYER_LATENCY_KEY
from fxprune.ir.units import Activation, UnitSpec
from fxprune.passes.context import Context
from fxprune.passes.latency import (
    MODEL_AGREEMENT,
    RETRIES,
    UNMEASURED_SPREAD,
    LatencyPass,
    _is_free,
    _kept_counts,
    _layer_kernels,
    _runs,
    _Timed,
    detect_step,
    disagreeing,
    latency_cost,
)
from fxprune.passes.rewrite import kept_shares
from fxprune.rules.conv import ConvUnit
from fxprune.rules.linear import LinearUnit
from fxprune.rules.units import REFERENCE, find_units
from tests.doubles import Contended, SyntheticEngine


# --- tables ---------------------------------------------------------------------------------------------
def _bilinear(i, o):
    return 0.5 + 0.01 * i + 0.02 * o + 0.001 * i * o


def test_a_table_is_exact_at_its_points_and_bilinear_between():
    widths_in, widths_out = np.array([1.0, 16, 48, 64]), np.array([8.0, 32, 40])
    table = LatencyTable(widths_in, widths_out, _bilinear(widths_in[:, None], widths_out[None, :]))
    for i in widths_in:
        for o in widths_out:
            assert table.at(i, o) == pytest.approx(_bilinear(i, o))
    rng = np.random.default_rng(0)
    w_in, w_out = rng.uniform(1, 64, 50), rng.uniform(8, 40, 50)
    np.testing.assert_allclose(table.at(w_in, w_out), _bilinear(w_in, w_out))  # arrays in, array out
    assert table.at(100, 100) == pytest.approx(_bilinear(64, 40))  # clamped outside the grid


def test_a_tied_table_follows_its_output_width_only():
    table = LatencyTable([96], [16, 48, 96], [[1.0, 2.0, 4.0]], tied=True)
    assert table.at(5, 32) == pytest.approx(1.5) and table.at(96, 32) == pytest.approx(1.5)
    assert table.at(0, 72) == pytest.approx(3.0)


def test_a_table_refuses_what_was_not_measured():
    with pytest.raises(ValueError, match="ascending"):
        LatencyTable([16, 8], [8], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="finite"):
        LatencyTable([8], [8], [[np.nan]])
    with pytest.raises(ValueError, match="does not match"):
        LatencyTable([8, 16], [8], [[1.0]])


def test_a_table_round_trips_through_json_types():
    table = LatencyTable([1, 16], [8, 16], [[1.0, 2.0], [3.0, 4.0]])
    again = LatencyTable.from_dict(table.to_dict())
    np.testing.assert_array_equal(again.ms, table.ms)
    np.testing.assert_array_equal(table.affine(2.0, 0.5).ms, 2 * table.ms + 0.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=12, max_size=12), st.booleans())
def test_a_monotone_table_never_prices_a_narrower_layer_above_a_wider_one(values, tied):
    rows = 1 if tied else 3
    table = LatencyTable([4] if tied else [1, 8, 16], [1, 8, 16, 32], np.reshape(values[:rows * 4], (rows, 4)), tied)
    monotone = table.monotone()
    assert np.all(monotone.ms <= table.ms)  # only lowered
    assert np.all(np.diff(monotone.ms, axis=0) >= 0) and np.all(np.diff(monotone.ms, axis=1) >= 0)
    for i in range(rows):  # each entry is the cheapest of the table at its widths or wider
        for j in range(4):
            assert monotone.ms[i, j] == table.ms[i:, j:].min()
    np.testing.assert_array_equal(monotone.monotone().ms, monotone.ms)  # already monotone: unchanged


# --- the step -------------------------------------------------------------------------------------------
def _staircase(step: int, size: int = 64, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Latency of widths 1..size on an engine that pads to ``step`` and is slow off its fast path."""
    widths = np.arange(1, size + 1)
    padded = -(-widths // step) * step
    fast = widths % 4 == 0
    latency = 0.01 * padded ** 2 * np.where(fast | (widths < step), 1.0, 1.6) + 0.2 * widths / size
    return latency * (1 + noise * np.random.default_rng(seed).standard_normal(size))


@pytest.mark.parametrize("step", [8, 16, 32])
def test_the_step_is_found_on_a_staircase(step):
    assert detect_step(_staircase(step)) == step


def test_the_step_survives_a_few_outliers():
    latency = _staircase(16, noise=0.02)
    latency[[20, 41]] *= 0.5  # two measurements taken while the machine was quiet, the others not
    assert detect_step(latency) == 16


def test_a_latency_without_steps_has_step_one():
    assert detect_step(0.01 * np.arange(1, 65) ** 2) == 1


def test_tables_measure_one_channel_the_grid_and_the_full_width():
    counts = _kept_counts(2048, 16, 8)
    assert counts[0] == 1 and counts[-1] == 2048 and len(counts) <= 9
    assert all(c % 16 == 0 for c in counts[1:])
    np.testing.assert_array_equal(_kept_counts(40, 16, 8), [1, 16, 32, 40])
    np.testing.assert_array_equal(_kept_counts(10, 16, 8), [1, 10])


# --- units --------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6())
        self.expand = nn.Conv2d(32, 64, 1, bias=False)
        self.norm = nn.BatchNorm2d(64)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.nn.functional.silu(self.norm(self.expand(x)))
        y = self.project(torch.relu(self.depthwise(y)))
        return self.head((x + y).mean((2, 3)))


def test_a_unit_spec_reads_back_from_its_cache_key_as_its_kind_and_the_keys_stay_as_cached():
    """Each kind (its rule's) comes back from a table's key as that kind; the keys are the ones tables were
    cached under before the kinds moved into the rules (``op`` and every field, whatever the kind)."""
    linear = LinearUnit((1, 64), 10, bias=False)
    for spec in (REFERENCE, linear):
        again = UnitSpec.from_key(spec.to_key())
        assert again == spec and type(again) is type(spec)
    assert REFERENCE.to_key() == {"op": "conv", "input_shape": [1, 64, 28, 28], "out_channels": 64, "kernel": [3, 3],
                                  "stride": [1, 1], "padding": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1,
                                  "bias": True, "batch_norm": True, "activation": {"name": "relu", "args": []},
                                  "dtype": "float32"}
    assert linear.to_key() == {"op": "linear", "input_shape": [1, 64], "out_channels": 10, "kernel": [], "stride": [],
                               "padding": [], "dilation": [], "groups": 1, "bias": False, "batch_norm": False,
                               "activation": None, "dtype": "float32"}
    assert linear != LinearUnit((1, 64), 10) and ConvUnit((1, 64), 10) != LinearUnit((1, 64), 10)
    with pytest.raises(ValueError, match="no unit kind"):
        UnitSpec.from_key({**linear.to_key(), "op": "deconv"})


def test_units_are_layers_with_the_norm_and_activation_engines_fuse():
    gm = fxprune.analyze(Block().eval(), (torch.randn(1, 3, 16, 16),))
    units = {u.layer.name: u for u in find_units(gm)}
    assert set(units) == {"stem_0", "expand", "depthwise", "project", "head"}
    stem, expand, depthwise = units["stem_0"], units["expand"], units["depthwise"]
    assert stem.nodes == ["stem_0", "stem_1", "stem_2"] and stem.spec.batch_norm
    assert stem.spec.activation == Activation("clip", (0.0, 6.0))
    assert not fxprune.analysis(gm).groups[stem.in_space.group_id].prunable  # the model's input
    assert expand.spec.bias and expand.spec.activation == Activation("silu")  # bias: where the norm folds in
    assert depthwise.spec.tied and depthwise.spec.activation == Activation("relu")
    assert units["project"].spec.activation is None  # the residual add is not an activation
    assert units["head"].spec.op == "linear" and units["head"].spec.input_shape == (1, 32)


# --- the pass with an engine whose latency is known ----------------------------------------------------
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(64, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.c = nn.Conv2d(48, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


def _analysed():
    return fxprune.analyze(Plain().eval(), (torch.randn(1, 3, 16, 16),))


def _run_known(gm, cache):
    engine = SyntheticEngine()
    with Context((torch.randn(1, 3, 16, 16),), engine, cache=cache, progress=False) as context:
        LatencyPass(context)(gm)
    return engine, find_units(gm)


def test_the_cost_model_reproduces_a_known_engine_exactly():
    gm = _analysed()
    engine, units = _run_known(gm, LatencyCache(None))
    calibration = gm.meta[LATENCY_KEY]
    assert calibration.step == 1  # the known engine's latency has no staircase
    assert calibration.context == pytest.approx(0.5)  # tables in reference units (0.5 ms) back to ms
    assert calibration.offset_ms == pytest.approx(0.0, abs=1e-9)  # the reduced copy agrees: nothing beyond
    cost = latency_cost(gm)
    assert cost.baseline == pytest.approx(engine.model_ms(Plain().eval(), (torch.randn(1, 3, 16, 16),)))
    analysis = fxprune.analysis(gm)
    for seed in range(3):
        plan = fxprune.random_plan(gm, 0.5, seed=seed)
        masks = {gid: np.isin(np.arange(g.size), plan.keep.get(gid, np.arange(g.size)))
                 for gid, g in analysis.groups.items()}
        share = {s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in analysis.spaces}
        width = {s.node: len(s.kept_positions(masks[s.group_id])) for s in analysis.spaces}
        expected = sum(engine.unit_ms(u.spec, width[u.in_space.node] if u.in_space else u.spec.in_channels,
                                      width[u.out_space.node]) for u in units)
        predicted_units = sum(t.price(share) for t in cost.terms if t.what in {u.layer.name for u in units})
        assert predicted_units == pytest.approx(expected, rel=1e-9)  # bilinear: interpolation is exact


class Residual(nn.Module):
    """A stem and two removable residual blocks of unequal op counts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.short = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 1))
        self.long = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.short(x)
        x = x + self.long(x)
        return self.head(x.mean((2, 3)))


def test_what_no_width_changes_is_paid_per_op_and_a_removed_block_takes_its_ops_part():
    gm = fxprune.analyze(Residual().eval(), (torch.randn(1, 3, 16, 16),))
    blocks, _ = fxprune.blocks(gm)
    assert [b.module for b in blocks] == ["short", "long"]
    with Context((torch.randn(1, 3, 16, 16),), SyntheticEngine(), progress=False) as context:
        LatencyPass(context)(gm)
    fixed_ms, cost = gm.meta[LATENCY_KEY].fixed_ms, latency_cost(gm)
    assert fixed_ms > 0
    fixed = [t for t in cost.terms if t.what.startswith("fixed")]
    assert sum(t.full for t in fixed) == pytest.approx(fixed_ms)
    per_block = {t.spaces[0]: t.full for t in fixed if t.spaces}
    assert set(per_block) == {b.space for b in blocks}
    # six ops and the add against three and the add
    assert per_block[blocks[1].space] / per_block[blocks[0].space] == pytest.approx(7 / 4)
    for block in blocks:  # removed, the block's ops' part goes with it, and no more
        shares = kept_shares(gm, Plan({}, (block.id,)))
        assert sum(float(t.price(shares)) for t in fixed) == pytest.approx(fixed_ms - per_block[block.space])


def test_tables_land_on_the_graph_and_a_second_run_measures_nothing(tmp_path):
    gm = _analysed()
    engine, units = _run_known(gm, LatencyCache(tmp_path))
    calls = engine.unit_calls
    assert calls == len(units) + 1  # every unit's table and the step probe
    assert all(u.layer.meta[LAYER_LATENCY_KEY].unit.spec == u.spec for u in units)
    again = _analysed()
    engine2, _ = _run_known(again, LatencyCache(tmp_path))
    assert engine2.unit_calls == 0
    assert again.meta[LATENCY_KEY].tables_measured == 0
    assert latency_cost(again).baseline == pytest.approx(latency_cost(gm).baseline)


def test_identical_layers_are_measured_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(*[nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])

        def forward(self, x):
            return self.convs(x)

    gm = fxprune.analyze(Twice().eval(), (torch.randn(1, 32, 8, 8),))
    engine = SyntheticEngine()
    with Context((torch.randn(1, 32, 8, 8),), engine, cache=LatencyCache(None), progress=False) as context:
        LatencyPass(context)(gm)
    calibration = gm.meta[LATENCY_KEY]
    # convs 1 and 2 vary both widths alike; conv 0's input and conv 3's output are the model's, fixed
    assert len(find_units(gm)) == 4 and calibration.tables == 3 and engine.unit_calls == 3 + 1  # + the step probe


def test_layers_outside_units_are_timed_in_the_fixed_part_not_as_memory_traffic():
    """A layer's rule says it is one (``Rule.layer``): a frozen one moves no memory the widths scale."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 25, 4))
    gm = fxprune.analyze(model.eval(), (torch.randn(1, 3, 6, 6),))
    free = {n.target: _is_free(gm, n) for n in gm.graph.nodes if n.op == "call_module"}
    assert free == {"0": True, "1": True, "2": False, "3": False, "4": True, "5": True}


class _Calls(nn.Module):
    """Views, a metadata read, dropout, indexing and ops that move data, each as a call the rules know."""

    def forward(self, x):
        n = x.size(0)
        y = torch.flatten(x, 1).view(n, -1)
        y = F.dropout(y, 0.1, training=False)
        z = y.permute(1, 0).contiguous()
        parts = torch.chunk(z, 2)
        return parts[0].type_as(x), torch.relu(y)


def test_the_rules_say_which_calls_move_data_and_which_run_at_all():
    """``Rule.deployed``: views move no data but run; metadata reads, dropout and indexing run no kernel."""
    gm = torch.fx.symbolic_trace(_Calls())
    verdict = {n.name: (_is_free(gm, n), _runs(gm, n)) for n in gm.graph.nodes if n.op.startswith("call")}
    assert verdict == {"size": (True, False), "flatten": (True, True), "view": (True, True),
                       "dropout": (True, False), "permute": (False, True), "contiguous": (False, True),
                       "chunk": (False, True), "getitem": (True, False), "type_as": (True, True),
                       "relu": (False, True)}


def test_latency_cost_needs_the_pass_first():
    with pytest.raises(fxprune.AnalysisRequiredError, match="LatencyPass"):
        latency_cost(_analysed())


# --- engines --------------------------------------------------------------------------------------------
def test_a_gpu_engine_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the engine is available")
    with pytest.raises(fxprune.EngineUnavailableError, match="CUDA GPU"):
        fxprune.compile(Plain().eval(), 0.5, (torch.randn(1, 3, 16, 16),), engine="cuda")


def test_unknown_engines_and_thread_counts_are_refused():
    with pytest.raises(fxprune.FxpruneError, match="unknown engine"):
        fxprune.compile(Plain().eval(), 0.5, (torch.randn(1, 3, 16, 16),), engine="tvm")
    with pytest.raises(fxprune.FxpruneError, match="threads"):
        fxprune.compile(Plain().eval(), 0.5, (torch.randn(1, 3, 16, 16),), threads=0)


# --- onnxruntime, for real ------------------------------------------------------------------------------
class Ladder(nn.Module):
    """Two convolutions whose widths set the latency, at a resolution where the latency is all theirs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(16, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.c = nn.Conv2d(128, 16, 3, padding=1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.export
def test_predicted_latency_orders_plans_as_onnxruntime_measures_them(tmp_path):
    from fxprune.backends.ort import OnnxRuntimeEngine

    inputs = (torch.randn(1, 16, 56, 56),)
    gm = fxprune.analyze(Ladder().eval(), inputs)
    engine = OnnxRuntimeEngine(threads=1, repeats=10)
    with Context(inputs, engine, cache=LatencyCache(tmp_path), progress=False) as context:
        LatencyPass(context, grid_points=4)(gm)
    cost = latency_cost(gm)
    analysis = fxprune.analysis(gm)
    stream = [g.id for g in analysis.prunable_groups()]

    def keep(counts):
        return Plan({gid: np.arange(k) for gid, k in zip(stream, counts) if k < analysis.groups[gid].size})
    plans = [keep((32, 32)), keep((32, 128)), keep((128, 128))]  # each clearly slower than the one before
    predicted = []
    for plan in plans:
        masks = {gid: np.isin(np.arange(g.size), plan.keep.get(gid, np.arange(g.size)))
                 for gid, g in analysis.groups.items()}
        predicted.append(cost.total({s.id: len(s.kept_positions(masks[s.group_id])) / s.size for s in analysis.spaces}))
    measured = engine.compare([fxprune.prune(gm, plan) for plan in plans], inputs)
    assert np.argsort(predicted).tolist() == np.argsort(measured).tolist() == [0, 1, 2]
    assert predicted[-1] == pytest.approx(cost.baseline)


def test_pairs_timed_on_a_contended_machine_are_left_out():
    # A full model at 10 ms and a pruned one at 4 ms (share 0.4); in half the pairs the machine was
    # contended and the small model slowed more (share 0.7): a paired ratio does not cancel that.
    before = [10.0, 10.2, 14.0, 10.1, 16.0, 10.0, 15.0, 14.5]
    after = [4.0, 4.1, 9.8, 4.0, 11.2, 4.05, 10.5, 10.2]
    ratios = quiet_ratios(before, after)
    assert len(ratios) == 4 and max(ratios) < 0.41
    assert np.median(np.array(after) / np.array(before)) > 0.5  # what all pairs would give
    everything_slow = quiet_ratios([20.0, 10.0, 30.0, 40.0], [8.0, 4.0, 12.0, 16.0])
    assert len(everything_slow) == 3 and np.allclose(everything_slow, 0.4)  # at least three, the quietest


def test_a_pruned_models_own_slow_rounds_count():
    # The reference runs at 10 ms throughout; the pruned model's rounds alternate between 2.0 and 2.6 ms
    # (seen on efficientnet_b0's 0.3 plan). Its share is read over both speeds, as an independent
    # round-robin timing reads it, not from its fast rounds alone (0.2).
    before = [10.0, 10.1, 10.0, 10.2, 10.0, 10.1, 10.0, 10.1]
    after = [2.0, 2.6, 2.0, 2.6, 2.0, 2.6, 2.0, 2.6]
    ratios = quiet_ratios(before, after)
    assert len(ratios) == 8
    assert np.median(ratios) == pytest.approx(np.median(np.array(after) / np.array(before)))
    assert np.median(ratios) > 0.22


class _Sleeper(nn.Module):
    """A unit that takes ``ms``, times 4 while the machine is slow: during the first ``slow_calls``
    runs of any unit (a stretch the unit's and the reference's runs share)."""

    calls = 0

    def __init__(self, ms: float, slow_calls: int) -> None:
        super().__init__()
        self.ms, self.slow_calls = ms, slow_calls

    def forward(self, x):
        type(self).calls += 1
        time.sleep(self.ms / 1e3 * (4 if type(self).calls <= self.slow_calls else 1))
        return x


def test_the_torch_engine_times_a_unit_against_the_reference_run_by_run(monkeypatch):
    """The machine runs 4x slower through the warmup and half the repeats. Timed in pairs with the
    reference, the unit's latency holds at 2x the reference's; timed through the slow stretch with the
    reference after it, it read 8x (the failure seen in CI: a narrow layer's table at 20x a wide one's)."""
    _Sleeper.calls = 0
    fake = lambda spec, width_in, width_out: (_Sleeper(1.0 if spec is REFERENCE else 2.0, 16), torch.zeros(1))  # noqa: E731
    monkeypatch.setattr(engines, "unit_module", fake)
    engine = engines.TorchEngine(threads=1, warmup=3, repeats=10)
    timing = engine.measure_units(LinearUnit((1, 64), 10), [(64, 10)])
    assert timing.ms[0] / timing.reference_ms[0] == pytest.approx(2.0, rel=0.25)
    assert timing.spread[0] < 0.25
    assert _Sleeper.calls == 2 * (3 + 10)  # unit and reference run in pairs, warmup included


def test_time_shares_uses_the_quiet_pairs():
    class Scripted(SyntheticEngine):
        """Rounds of a scripted length: 10 ms and 4 ms, both 50% and 150% slower in pairs 2 and 3."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def time_round(self, run, seconds=0.0, warmup=1) -> float:
            pair, self.calls = self.calls // 2, self.calls + 1
            return run() * (1.5 if pair == 2 else 2.5 if pair == 3 else 1.0)

    full_ms, shares = Scripted().time_shares(lambda: 10.0, [lambda: 4.0], rounds=8)
    assert full_ms == 10.0 and shares == [pytest.approx(0.4)]


def test_a_linear_only_model_gets_latency_tables_on_onnxruntime(tmp_path):
    """onnxruntime fuses a Gemm and its Relu into a kernel named ``fused <gemm>``: still the unit's kernel."""
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    pruned = fxprune.compile(model, fxprune.Latency(0.8), (torch.randn(64, 256),), refine=0, progress=False,
                             cache=tmp_path)
    report = fxprune.report(pruned)
    assert report.latency_step is not None and report.predicted_latency_ms_after < report.predicted_latency_ms_before
    assert any(g.kept < g.total for g in report.groups)


# --- tables that heal ------------------------------------------------------------------------------------
class Busy(SyntheticEngine):
    """The known engine on a busy machine: the first timings of every layer's unit (``noisy_calls`` of them)
    have every other point off by 3x and scattered (spread 0.5); later timings are quiet and right. The step
    probe is timed quietly (a noisy one finds another step, so other tables)."""

    def __init__(self, noisy_calls: int = 1, off: float = 3.0) -> None:
        super().__init__()
        self.noisy_calls, self.off = noisy_calls, off
        self.calls: dict = {}
        self.points: list[int] = []

    def measure_units(self, spec, points):
        timing = super().measure_units(spec, points)
        self.points.append(len(points))
        self.calls[spec] = self.calls.get(spec, 0) + 1
        if self.calls[spec] <= self.noisy_calls and spec != REFERENCE:
            timing.ms[::2] *= self.off
            timing.spread[::2] = 0.5
        return timing


def _tables(gm) -> dict:
    return {u.layer.name: u.layer.meta[LAYER_LATENCY_KEY].table.ms for u in find_units(gm)}


def _run(gm, engine, cache):
    with Context((torch.randn(1, 3, 16, 16),), engine, cache=cache, progress=False) as context:
        LatencyPass(context)(gm)
    return gm.meta[LATENCY_KEY]


def test_points_timed_on_a_busy_machine_are_timed_again_and_the_quiet_timing_kept(tmp_path):
    clean = _analysed()
    _run(clean, SyntheticEngine(), LatencyCache(None))
    gm, engine = _analysed(), Busy()
    calibration = _run(gm, engine, LatencyCache(tmp_path))
    for name, ms in _tables(gm).items():
        # healed where the scatter moves the table: a point 3x off with spread 0.5 is timed again unless it
        # takes under 0.2 of the busy table's largest latency (its scatter then under SPREAD_LIMIT of the
        # table), itself at most 3x off: left 2/3 of 0.2 x 3 of the clean table's largest at most
        clean_ms = _tables(clean)[name]
        assert np.abs(ms - clean_ms).max() <= 0.4 * clean_ms.max() and np.isclose(ms.max(), clean_ms.max())
    # each unit timed once whole, then only the material ones of its noisy half again
    assert len(engine.points) == 1 + 2 * calibration.tables
    assert 0 < engine.points[2] <= (engine.points[1] + 1) // 2
    assert calibration.tables_measured == calibration.tables + 1 and not calibration.healed  # timed now: not healed


def test_a_table_timed_on_a_busy_machine_is_timed_at_most_twice_more_and_then_read_as_stored(tmp_path):
    """Retiming is bounded: a point busy through its retries is kept with its scatter, the summary says the
    machine was busy, and the next compile times nothing again for noise alone."""
    # busy for every retry: the noisy points are stored as the best there was (scattered, but right: a table
    # a busy machine made wrong is what the whole-model check heals, tested above)
    busy = Busy(noisy_calls=10, off=1.0)
    first = _run(_analysed(), busy, LatencyCache(tmp_path))
    assert all(busy.calls[spec] == 1 + RETRIES for spec in busy.calls if spec != REFERENCE)
    assert first.busy_points > 0 and first.busy_spread == 0.5 and "the machine was busy" in first.summary()
    again = SyntheticEngine()
    second = _run(_analysed(), again, LatencyCache(tmp_path))
    assert again.unit_calls == 0 and second.tables_measured == 0 and not second.healed
    assert second.busy_points == 0 and "busy" not in second.summary()


def test_a_warm_compile_whose_models_run_as_cached_uses_their_cached_timing(tmp_path):
    """The scale of the tables (the whole model and its reduced copy) is reused where this run times the
    reduced copy's share of the whole model as the cached timing did, however fast the machine runs now, so a
    warm compile solves the same plans; contention that moves that share makes this run's timing scale them."""
    first = _run(_analysed(), Contended(1.0), LatencyCache(tmp_path))
    assert not first.model_timing_cached
    second = _run(_analysed(), Contended(1.5), LatencyCache(tmp_path))  # uniformly slower: no share moves
    assert second.model_timing_cached and "earlier compile's timing" in second.summary()
    # nothing was timed that could scatter, but the whole model ran 1.5x slower than cached: a busy machine
    assert second.slowdown == pytest.approx(1.5) and "ran 1.5x as slow" in second.summary()
    assert first.slowdown == 1.0 and "busy" not in first.summary()
    assert (second.measured_ms, second.reduced_ms) == (first.measured_ms, first.reduced_ms)
    full_params = sum(p.numel() for p in _analysed().parameters())
    third = _run(_analysed(), Contended(1.0, 1 + 2 * MODEL_AGREEMENT, full_params), LatencyCache(tmp_path))
    assert not third.model_timing_cached
    assert third.reduced_ms == pytest.approx(first.reduced_ms * (1 + 2 * MODEL_AGREEMENT))


def test_the_reduced_copys_share_agrees_within_the_scatter_this_machine_has_shown(tmp_path):
    """Quiet compiles' shares of the reduced copy are kept (this machine's run-to-run scatter): a share back
    at an earlier one reuses the cached timing, though it is off the latest by more than MODEL_AGREEMENT."""
    full_params = sum(p.numel() for p in _analysed().parameters())
    first = _run(_analysed(), Contended(1.0), LatencyCache(tmp_path))
    moved = _run(_analysed(), Contended(1.0, 1 + 2 * MODEL_AGREEMENT, full_params), LatencyCache(tmp_path))
    assert not moved.model_timing_cached  # outside what was seen: this run's timing scales the tables
    back = _run(_analysed(), Contended(1.0), LatencyCache(tmp_path))  # 2 x MODEL_AGREEMENT off the latest
    assert back.model_timing_cached and (back.measured_ms, back.reduced_ms) == (moved.measured_ms, moved.reduced_ms)
    assert back.tables_measured == 0
    beyond = _run(_analysed(), Contended(1.0, 1 + 5 * MODEL_AGREEMENT, full_params), LatencyCache(tmp_path))
    assert not beyond.model_timing_cached
    assert beyond.reduced_ms == pytest.approx(first.reduced_ms * (1 + 5 * MODEL_AGREEMENT))


class StaleOnce(SyntheticEngine):
    """One unit's first timing is wrong by ``off`` yet looks quiet (the issue's 11.7 ms conv beside its 2.2 ms
    twin); with ``in_model`` that unit also runs ``in_model`` x slower inside the whole model."""

    def __init__(self, target: int, off: float = 1.0, in_model: float = 1.0) -> None:
        super().__init__()
        self.target, self.off, self.in_model = target, off, in_model
        self.seen: dict = {}

    def measure_units(self, spec, points):
        timing = super().measure_units(spec, points)
        self.seen[spec] = self.seen.get(spec, 0) + 1
        if spec.out_channels == self.target and self.seen[spec] == 1:
            timing.ms *= self.off
        return timing

    def in_model_ms(self, spec) -> float:
        return super().in_model_ms(spec) * (self.in_model if spec.out_channels == self.target else 1.0)


def test_a_table_that_disagrees_with_the_whole_model_is_timed_again():
    clean = _analysed()
    _run(clean, SyntheticEngine(), LatencyCache(None))
    gm, engine = _analysed(), StaleOnce(target=48, off=5.0)
    calibration = _run(gm, engine, LatencyCache(None))
    assert calibration.tables_checked == calibration.layers == 4
    assert len(calibration.healed) == 1
    assert "b_0" in calibration.healed[0] and "the old table was off" in calibration.healed[0]
    assert all(np.allclose(ms, _tables(clean)[name]) for name, ms in _tables(gm).items())


def test_a_layer_that_does_run_slower_in_the_model_keeps_its_table():
    gm, engine = _analysed(), StaleOnce(target=48, in_model=5.0)
    calibration = _run(gm, engine, LatencyCache(None))
    assert len(calibration.healed) == 1 and "it runs so in the model" in calibration.healed[0]


@pytest.mark.parametrize("kernels, expected", [
    ([1.0, 2.0, 3.0, 4.0, 25.0], [4]),  # one layer 5x the others' ratio
    ([2.0, 4.0, 6.0, 8.0, 10.0], []),  # every layer 2x: the machine's speed, no table's error
    ([1.0, 2.0, 3.0, 4.0, 5.0 + 0.001 * 5], []),
    ([1.0, 2.0, 3.0, 4.0, 0.5], [4]),  # 10x faster in the model
])
def test_disagreeing_finds_the_one_table_off_from_the_others(kernels, expected):
    tables = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert disagreeing(list(zip(tables, kernels))) == expected
    assert disagreeing(list(zip([1.0, 2.0, 3.0, 4.0, 0.1], [1.0, 2.0, 3.0, 4.0, 0.5]))) == [4]  # 4% of the time
    # 0.001% of the time
    assert disagreeing(list(zip([100.0, 200.0, 300.0, 0.001], [100.0, 200.0, 300.0, 0.005]))) == []


def test_layers_are_found_among_fp32_and_int8_kernels_by_their_shapes():
    conv = types.SimpleNamespace(spec=ConvUnit((1, 32, 16, 16), 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1,
                                                True, True, Activation("relu")))
    linear = types.SimpleNamespace(spec=LinearUnit((1, 64), 10))
    fp32 = [KernelTime("Conv", [[1, 32, 16, 16], [64, 32, 3, 3], [64]], [[1, 64, 16, 16]], 40.0),
            KernelTime("Gemm", [[1, 64], [10, 64], [10]], [[1, 10]], 2.0),
            KernelTime("Add", [[1, 64, 16, 16], [1, 64, 16, 16]], [[1, 64, 16, 16]], 5.0)]
    assert [(u.spec.op, us) for u, us in _layer_kernels([conv, linear], fp32)] == [("conv", 40.0), ("linear", 2.0)]
    int8 = [KernelTime("QLinearConv", [[1, 16, 16, 32], [], [], [64], [64], [], [], [64]], [[1, 16, 16, 64]], 12.0),
            KernelTime("QGemm", [[1, 64], [], [], [10], [10], [10], [], []], [[1, 10]], 1.0),
            KernelTime("QuantizeLinear", [[1, 32, 16, 16], [], []], [[1, 32, 16, 16]], 3.0)]
    assert [(u.spec.op, us) for u, us in _layer_kernels([conv, linear], int8)] == [("conv", 12.0), ("linear", 1.0)]
    other = types.SimpleNamespace(spec=ConvUnit((1, 32, 16, 16), 32, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1,
                                                True, True, None))
    assert _layer_kernels([other], fp32 + int8) == []  # another output width: no kernel of its shapes


def test_a_layer_too_small_to_time_is_kept_as_a_noisy_zero_not_a_bad_cache_entry():
    timed = _Timed.empty(3)
    timed.merge(np.array([0, 1, 2]), types.SimpleNamespace(ms=np.array([-0.01, 0.5, 0.2]), reference_ms=np.ones(3),
                                                     spread=np.array([np.inf, 0.01, np.inf])))
    assert timed.ms.tolist() == [0.0, 0.5, 0.2]
    assert timed.spread.tolist() == [UNMEASURED_SPREAD, 0.01, UNMEASURED_SPREAD]
    assert timed.noisy().tolist() == [2]  # the zero costs nothing however it scatters: not timed again
    assert _Timed.parse(timed.to_value(), 3).ms.tolist() == [0.0, 0.5, 0.2]  # what the cache stores parses again
