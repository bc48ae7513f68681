"""Channel spaces, groups and plans: what the dependency pass finds and what a plan keeps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ChannelSpace:
    """One channel axis of one tensor (the output of one fx node) and where its channels sit in a group.

    ``channel_index[j]`` is the group channel that element ``j`` of this axis belongs to. Several elements
    may share a group channel: a flatten maps one channel to a block of features, a grouped convolution
    or a GroupNorm makes a whole block one pruning unit.
    """

    node: str
    dim: int
    size: int
    output_index: int = 0  # which output of the node, for split/chunk results
    id: int = -1  # position in the dependency pass's space list
    group_id: int = -1
    channel_index: np.ndarray | None = None

    @property
    def group_channels(self) -> np.ndarray:
        """``channel_index`` of a space the dependency pass grouped (every space of an analysed graph)."""
        assert self.channel_index is not None, f"the channel space of {self.node} is not grouped yet"
        return self.channel_index

    def kept_positions(self, keep_mask: np.ndarray) -> np.ndarray:
        """Positions along ``dim`` that survive, given the group's boolean keep mask over its channels."""
        return np.flatnonzero(keep_mask[self.channel_index])


@dataclass
class NodeChannels:
    """What the dependency pass learned about one node (``node.meta["fxprune"]``).

    ``spaces``: the channel axis of each tensor the node outputs (one entry per output; ``None`` where
    an output has no tracked axis). ``rule``: the name of the rule that handled the node, which the
    rewrite applies again; ``notes``: what that rule decided while coupling (a gather's permutation,
    traced sizes to write back) for its own rewrite.
    """

    spaces: list[ChannelSpace | None] = field(default_factory=list)
    rule: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> ChannelSpace | None:
        return self.spaces[0] if self.spaces else None


@dataclass
class GroupMember:
    """A channel space that belongs to a group, as a reference a user can read."""

    node: str
    dim: int
    size: int


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: keeping group channel i keeps it in every member."""

    id: int
    size: int
    members: list[GroupMember]
    frozen_reason: str | None = None
    norm_coupled: bool = False  # a normalization computes statistics across these channels
    # channels every plan keeps: they reach a space that can't change (an op no rule knows, the model's
    # inputs and outputs), which a concat or a residual couples with channels that can. The rest of the
    # group is prunable; a group whose every channel is fixed is frozen instead (``frozen_reason``).
    fixed: np.ndarray | None = None
    fixed_reason: str | None = None

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and self.size > 1

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.frozen_reason or 'single unit'}"
        if self.prunable and self.fixed is not None:
            state += f", {len(self.fixed)} channels kept ({self.fixed_reason})"
        names = ", ".join(m.node for m in self.members[:4]) + (" ..." if len(self.members) > 4 else "")
        return f"group {self.id}: {self.size} channels, {len(self.members)} members ({names}); {state}"


@dataclass
class Nest:
    """Grouped-query attention's two levels: every channel of group ``inner`` (a query head) reads one channel
    of group ``outer`` (a key-value head), ``parent[i]``. A plan keeps the same number of inner channels under
    every kept outer channel and none under a dropped one, so every layer stays a valid GQA layer."""

    inner: int
    outer: int
    parent: np.ndarray

    def violation(self, inner_kept: np.ndarray, outer_kept: np.ndarray) -> str | None:
        """Why boolean keep masks over the two groups break the nesting, or None where they keep it."""
        under = np.bincount(self.parent[inner_kept], minlength=outer_kept.size)
        if under[~outer_kept].any():
            return f"it keeps channels of group {self.inner} under dropped channels of group {self.outer}"
        if not outer_kept.any() or len(set(under[outer_kept].tolist())) != 1 or under[outer_kept][0] == 0:
            return (f"it keeps {sorted(set(under[outer_kept].tolist()))} channels of group {self.inner} under "
                    f"the kept channels of group {self.outer}, which must each keep the same number, at least one")
        return None

    def children(self) -> list[np.ndarray]:
        """Per outer channel, the inner channels under it, in channel order."""
        return [np.flatnonzero(self.parent == o) for o in range(int(self.parent.max()) + 1)]

    def completed(self, inner_kept: set[int], outer_kept: set[int]) -> set[int]:
        """``inner_kept`` made to fit ``outer_kept``: nothing under a dropped outer channel, and under each
        kept one as many as the most any keeps (at least one), filled in channel order."""
        children = self.children()
        kept = {i for i in inner_kept if int(self.parent[i]) in outer_kept}
        count = max([1] + [len(kept.intersection(children[o].tolist())) for o in outer_kept])
        for o in outer_kept:
            missing = [int(i) for i in children[o] if int(i) not in kept]
            kept.update(missing[:count - len(kept.intersection(children[o].tolist()))])
        return kept


@dataclass
class Block:
    """A residual block ``out = x + f(x)`` a plan may remove whole (the block pass finds them).

    ``nodes``: the branch ``f`` and the add, what removing the block deletes from the graph; ``output``:
    the branch's result ``f(x)``; ``skip``: ``x``, which the add's users read instead. ``module``: the
    module of the user's model that goes with it, ``kind`` how it goes: ``"skip"``, the module is the whole
    block and becomes ``modules.Skip`` (returns ``x``); ``"zero"``, it computes ``f(x)`` and becomes
    ``modules.ZeroBranch``. ``zeroed``: parameters whose zeroing makes ``f(x) = 0`` (the masked
    reference). ``groups``: the prunable channel groups wholly inside the branch (none where its channels are
    frozen: Phi-3's fused attention; the block is then kept or removed whole).
    """

    id: int
    add: str
    skip: str
    output: str
    nodes: tuple[str, ...]
    module: str
    kind: str
    zeroed: tuple[str, ...]
    groups: tuple[int, ...]
    share: float = 1.0  # ||f(x)|| / (||x|| + ||f(x)||) on the example inputs: how much the branch adds
    returns: int = 0  # a "zero" module that returned a tuple: its length (the branch's result first)

    @property
    def space(self) -> int:
        """The id cost terms of the block carry as a space: kept share 1 while it stays, 0 once dropped."""
        return block_space(self.id)


def block_space(block_id: int) -> int:
    """Blocks' spaces are negative, apart from channel spaces (numbered from 0)."""
    return -1 - block_id


@dataclass
class Analysis:
    """The dependency pass's graph-level result (``gm.meta["fxprune"]``): groups and every space; the
    block pass adds the removable residual blocks, why other residual adds are not, and ``sole``."""

    groups: dict[int, ChannelGroup]
    spaces: list[ChannelSpace] = field(default_factory=list, repr=False)
    blocks: list[Block] = field(default_factory=list)
    kept_blocks: dict[str, str] = field(default_factory=dict)  # add node -> why its block is not removable
    nests: list[Nest] = field(default_factory=list)  # grouped-query attention's query heads under kv heads
    # blocks that alone compute an operation found nowhere else in the model (a decoder's attention layers,
    # its only token mixing): (the operation, the blocks' ids); a solved plan keeps at least one of each
    sole: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups.values() if g.prunable]

    def member_channels(self, group_id: int) -> list[np.ndarray]:
        """Group channels present in each member space; a plan must keep one of each to be valid."""
        return [np.unique(s.channel_index) for s in self.spaces
                if s.group_id == group_id and s.channel_index is not None]


@dataclass
class Importance:
    """The score pass's result (``gm.meta["fxprune_importance"]``): one score per channel of every group."""

    criterion: str
    scores: dict[int, np.ndarray]


@dataclass
class Plan:
    """Kept group channels per group id, and the ids of the residual blocks removed whole: the one object a
    solver produces and the rewrite consumes."""

    keep: dict[int, np.ndarray]
    drop: tuple[int, ...] = ()

    def to_json(self) -> str:
        raw: dict[str, list[int]] = {str(gid): [int(i) for i in idx] for gid, idx in sorted(self.keep.items())}
        if self.drop:  # absent for a width-only plan, whose text stays what it was
            raw[DROP] = sorted(int(b) for b in self.drop)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        drop = tuple(int(b) for b in raw.pop(DROP, []))
        return cls({int(gid): np.asarray(idx, dtype=np.int64) for gid, idx in raw.items()}, drop)


DROP = "blocks removed"  # the key of a plan's removed blocks in its JSON text
