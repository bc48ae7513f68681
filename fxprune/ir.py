"""The IR that passes exchange through ``node.meta["fxprune"]`` and ``GraphModule.meta["fxprune"]``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

META_KEY = "fxprune"


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

    def kept_positions(self, keep_mask: np.ndarray) -> np.ndarray:
        """Positions along ``dim`` that survive, given the group's boolean keep mask over its channels."""
        return np.flatnonzero(keep_mask[self.channel_index])


@dataclass
class NodeChannels:
    """What the dependency pass learned about one node: the channel axis of each tensor it outputs.

    ``spaces`` has one entry per output (one for a plain tensor, several for split/chunk results);
    ``None`` where the output has no tracked channel axis. ``rewrite`` names the rewrite rule the
    rewrite pass must apply to the node (set by the op table), ``rewrite_args`` its parameters.
    """

    spaces: list[ChannelSpace | None] = field(default_factory=list)
    rewrite: str | None = None
    rewrite_args: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None  # this layer's contribution to its group's importance

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
    importance: np.ndarray | None = None  # one score per channel, from the score pass
    criterion: str | None = None  # which importance criterion produced ``importance``

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and self.size > 1

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.frozen_reason or 'single unit'}"
        names = ", ".join(m.node for m in self.members[:4]) + (" ..." if len(self.members) > 4 else "")
        return f"group {self.id}: {self.size} channels, {len(self.members)} members ({names}); {state}"


@dataclass
class Plan:
    """Kept group channels per group id: the one object a solver produces and the rewrite consumes."""

    keep: dict[int, np.ndarray]

    def to_json(self) -> str:
        return json.dumps({str(gid): [int(i) for i in idx] for gid, idx in sorted(self.keep.items())})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        raw = json.loads(text)
        return cls({int(gid): np.asarray(idx, dtype=np.int64) for gid, idx in raw.items()})
