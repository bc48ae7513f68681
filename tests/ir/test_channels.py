"""ir/channels.py: the nest of grouped-query attention (query heads under kv heads)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprune.ir.channels import Nest


@settings(max_examples=200, deadline=None)
@given(kv=st.integers(1, 4), per=st.integers(1, 4), data=st.data())
def test_a_completed_nest_keeps_as_many_query_heads_under_each_kept_kv_head_and_none_under_a_dropped_one(kv, per, data):
    nest = Nest(inner=0, outer=1, parent=np.repeat(np.arange(kv), per))
    outer = set(data.draw(st.sets(st.integers(0, kv - 1), min_size=1)))
    inner = set(data.draw(st.sets(st.integers(0, kv * per - 1))))
    kept = nest.completed(inner, outer)
    inner_mask, outer_mask = np.zeros(kv * per, dtype=bool), np.zeros(kv, dtype=bool)
    inner_mask[list(kept)], outer_mask[list(outer)] = True, True
    assert nest.violation(inner_mask, outer_mask) is None
    assert {i for i in inner if i // per in outer} <= kept  # what the user kept under kept kv heads stays


def test_a_nest_says_what_a_plan_breaks():
    nest = Nest(inner=3, outer=4, parent=np.array([0, 0, 1, 1]))
    kv_both = np.array([True, True])
    assert nest.violation(np.array([True, False, True, False]), kv_both) is None
    assert "same number" in nest.violation(np.array([True, True, True, False]), kv_both)
    assert "under dropped channels of group 4" in nest.violation(np.array([True, False, True, False]),
                                                                  np.array([True, False]))
