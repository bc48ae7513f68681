"""The coupling API rules call: channel spaces, element couplings, freezing, and the grouping at the end.

Every tracked axis gets a range of element ids. A rule *couples* elements ("element i of this axis is
element j of that one"); coupled elements become one group channel (connected components over all
elements, scipy), coupled axes one group (connected components over axes, networkx).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.fx

from fxprune.ir import graph
from fxprune.ir.channels import Analysis, ChannelGroup, ChannelSpace, GroupMember, Nest, NodeChannels
from fxprune.ir.keys import CHANNELS_KEY


@dataclass
class Pending:
    """A channel axis split over several dims by a chain of shape ops (e.g. a channel shuffle)."""

    origin: ChannelSpace
    origin_node: torch.fx.Node
    labels: torch.Tensor  # origin element index at every position of this node's output
    chain: tuple[torch.fx.Node, ...] = ()  # the ops from the origin to here
    chain_labels: tuple[torch.Tensor, ...] = ()  # ``labels`` at each node of the chain (a node that adds two
    # layouts of one origin, rotary's ``q * cos + rotate_half(q) * sin``, is listed once per layout)
    shared: tuple[tuple[torch.fx.Node, frozenset[int]], ...] = ()  # nodes of the chain whose other operands
    # vary along these dims (rotary's cos/sin along the head's width): no head may run along them

    def extended(self, node: torch.fx.Node, labels: torch.Tensor, shared: frozenset[int] = frozenset()) -> "Pending":
        """This layout after ``node``, which put the positions where ``labels`` says."""
        return Pending(self.origin, self.origin_node, labels, self.chain + (node,), self.chain_labels + (labels,),
                       self.shared + (((node, shared),) if shared else ()))

    @staticmethod
    def merged(parts: list["Pending"], node: torch.fx.Node, labels: list[torch.Tensor], out: torch.Tensor,
               shared: frozenset[int] = frozenset()) -> "Pending":
        """One layout from several of the same origin that ``node`` combines position by position (an add)
        or along a dim (a cat); ``labels[k]`` is part k as ``node``'s output holds it, ``out`` the result."""
        seen: dict[tuple[int, int], tuple[torch.fx.Node, torch.Tensor]] = {}
        for part in parts:
            for chain_node, chain_labels in zip(part.chain, part.chain_labels):
                seen.setdefault((id(chain_node), id(chain_labels)), (chain_node, chain_labels))
        for each in labels:
            seen[(id(node), id(each))] = (node, each)
        chain = tuple(n for n, _ in seen.values())
        shared_nodes = tuple(dict.fromkeys(s for part in parts for s in part.shared)) + \
            (((node, shared),) if shared else ())
        return Pending(parts[0].origin, parts[0].origin_node, out, chain, tuple(each for _, each in seen.values()),
                       shared_nodes)


class ChannelBuilder:
    """Mutable state of one dependency analysis; rules call its methods.

    ``rule_for`` is the registry's lookup (a rule asks which rule handles another node, e.g. whether a
    parameter reaches it through shape ops only).
    """

    def __init__(self, gm: torch.fx.GraphModule, rule_for: Callable[[torch.nn.Module, torch.fx.Node], Any]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self._rule_for = rule_for
        self.spaces: list[ChannelSpace] = []
        self.base: list[int] = []  # first element id of each space
        self.num_elements = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.space_graph = nx.Graph()
        self.frozen: dict[int, str] = {}
        self.norm_coupled: set[int] = set()
        self.pending: dict[torch.fx.Node, Pending] = {}
        self.tensor_claims: dict[tuple[str, int], ChannelSpace] = {}
        # Channel widths read at run time (x.size(), x.shape): which space each value measures, and
        # the uses that stay correct after pruning only if a condition holds once groups are known.
        self.widths: dict[torch.fx.Node, dict[int | None, ChannelSpace]] = {}
        self.width_uses: list[tuple[ChannelSpace, ChannelSpace | None, torch.fx.Node, int | None]] = []
        self.replaced_chains: set[torch.fx.Node] = set()
        self.fell_back: set[torch.fx.Node] = set()  # nodes whose rule froze them as an unknown op would be
        self.parameter_expressions: dict[torch.fx.Node, bool] = {}  # computed from get_attr tensors alone
        self.nests: list[tuple[ChannelSpace, ChannelSpace, np.ndarray]] = []  # (inner, outer, outer position)
        self._canonical: dict[str, str] | None = None
        self._position: dict[torch.fx.Node, int] | None = None

    # --- reading the traced graph -------------------------------------------------------------
    shape = staticmethod(graph.shape)
    tensor_shape = staticmethod(graph.tensor_shape)
    value = staticmethod(graph.value)

    def rule_for(self, node: torch.fx.Node) -> Any:
        """The ``fxprune.rules.Rule`` that handles ``node``."""
        return self._rule_for(self.gm, node)

    def module(self, node: torch.fx.Node) -> torch.nn.Module:
        return self.modules[node.target]

    def info(self, node: torch.fx.Node) -> NodeChannels:
        if CHANNELS_KEY not in node.meta:
            node.meta[CHANNELS_KEY] = NodeChannels()
        return node.meta[CHANNELS_KEY]

    def take_pending(self, node: torch.fx.Node, user: torch.fx.Node) -> Pending | None:
        """The pending layout of ``node`` as ``user`` reads it; forgotten once its last user has read it
        (a fused qkv's layout is read by three selects)."""
        pending = self.pending.get(node)
        if pending is not None:
            if self._position is None:
                self._position = {n: i for i, n in enumerate(self.gm.graph.nodes)}
            if self._position[user] >= max(self._position[u] for u in node.users):
                del self.pending[node]
        return pending

    def space_of(self, node, index: int = 0) -> ChannelSpace | None:
        """The tracked channel space of a node's output (``index`` for tuple outputs)."""
        if not isinstance(node, torch.fx.Node):
            return None
        if node in self.pending:
            pend = self.pending.pop(node)
            self.freeze(pend.origin, f"its channel axis is split over several dims by {pend.origin_node.name} "
                        f"and the result is used by an op that is not a pure rearrangement")
            return None
        return graph.space(node, index)

    # --- building spaces and couplings --------------------------------------------------------
    def new_space(self, node: torch.fx.Node, dim: int, size: int | None = None, index: int = 0) -> ChannelSpace:
        """Create the channel space of output ``index`` of ``node`` along ``dim``."""
        if size is None:
            size = self.tensor_shape(node)[dim]
        space = ChannelSpace(node=node.name, dim=dim, size=int(size), output_index=index, id=len(self.spaces))
        self.spaces.append(space)
        self.base.append(self.num_elements)
        self.num_elements += int(size)
        self.space_graph.add_node(space.id)
        spaces = self.info(node).spaces
        while len(spaces) <= index:
            spaces.append(None)
        spaces[index] = space
        return space

    def ensure_space(self, node: torch.fx.Node, dim: int) -> ChannelSpace:
        """The space of ``node`` along ``dim``; created on demand, frozen unless node is a parameter."""
        shape = self.tensor_shape(node)
        dim = dim % len(shape)
        space = self.space_of(node)
        if space is not None:
            if space.dim != dim:
                self.freeze(space, f"{node.name} is used with channels on dim {dim} and on dim {space.dim}")
            return space
        space = self.new_space(node, dim)
        if node.op == "placeholder":
            self.freeze(space, f"model input {node.name}")
        elif node.op != "get_attr":
            self.freeze(space, f"{node.name} comes from an op whose channel mapping fxprune does not know")
        return space

    def couple(self, a: ChannelSpace, b: ChannelSpace, a_pos=None, b_pos=None) -> None:
        """Say that element a_pos[k] of ``a`` and b_pos[k] of ``b`` are the same channel (default: all, in order)."""
        a_pos = np.arange(a.size) if a_pos is None else np.asarray(a_pos)
        b_pos = np.arange(b.size) if b_pos is None else np.asarray(b_pos)
        if a_pos.shape != b_pos.shape:
            raise ValueError(f"cannot couple {a.node} ({a_pos.size}) with {b.node} ({b_pos.size})")
        self.edges_a.append(self.base[a.id] + a_pos)
        self.edges_b.append(self.base[b.id] + b_pos)
        self.space_graph.add_edge(a.id, b.id)

    def nest(self, inner: ChannelSpace, outer: ChannelSpace, parent: np.ndarray) -> None:
        """Position h of ``inner`` reads position ``parent[h]`` of ``outer`` (grouped-query attention: query head
        h reads kv head h // group): two groups pruned as one, inner channels evenly under kept outer ones
        (``ir.channels.Nest``). Where the two do not end up as such groups, ``finish`` couples them instead."""
        self.nests.append((inner, outer, np.asarray(parent)))

    def couple_blocks(self, space: ChannelSpace, block: int) -> None:
        """Make every run of ``block`` consecutive elements of ``space`` one pruning unit."""
        if block <= 1:
            return
        positions = np.arange(space.size)
        firsts = positions - positions % block
        self.edges_a.append(self.base[space.id] + positions)
        self.edges_b.append(self.base[space.id] + firsts)

    def head_space(self, node: torch.fx.Node, dim: int) -> ChannelSpace | None:
        """The space of ``node``'s axis ``dim``, whose positions are *heads*: blocks of channels an attention
        op keeps whole (q, k, v after ``view(B, S, H, D)``, a fused qkv after ``reshape``/``permute``/``unbind``).

        A node whose channel axis is split over several dims (pending) gets a space along ``dim``, each
        position coupled to the block of channels it holds; every node of the chain that split them gets a
        space along the dim its heads vary on, so the rewrite resizes the head count in its sizes. None (and
        the channels frozen) when the blocks do not line up with heads.
        """
        dim = dim % len(self.tensor_shape(node))
        pending = self.pending.pop(node, None)
        if pending is None:
            space = self.space_of(node)
            if space is not None and space.dim != dim:
                self.freeze(space, f"{node.name} has its channels on dim {space.dim}, not on the heads' dim {dim}")
                return None
            return space
        labels = pending.labels.numpy() - 1  # origin element at each position
        blocks = [np.unique(np.take(labels, h, axis=dim)) for h in range(labels.shape[dim])]
        distinct = list({tuple(block): block for block in blocks}.values())
        every = np.concatenate(distinct)
        if np.unique(every).size != every.size or (every < 0).any():
            self.freeze(pending.origin, f"{node.name}: the heads on dim {dim} do not hold disjoint blocks of channels")
            return None
        # a head repeated (grouped-query attention's repeat_kv: kv head g read by query heads g*r .. g*r+r-1)
        # is one channel at every position that holds it
        first_position = [next(h for h, block in enumerate(blocks) if np.array_equal(block, d)) for d in distinct]
        head_of = np.full(pending.origin.size, -1)
        for k, block in enumerate(distinct):
            head_of[block] = first_position[k]
        heads = self.new_space(node, dim)
        for h, block in enumerate(blocks):
            self.couple(heads, pending.origin, np.full(block.size, h), block)
        avoid = self._shared_dims(pending)
        for chain_node, chain_labels in zip(pending.chain, pending.chain_labels):
            if chain_node is node and chain_labels is pending.labels:
                continue
            if not self.chain_space(chain_node, head_of[chain_labels.numpy() - 1], heads, avoid.get(chain_node, ())):
                self.freeze(pending.origin, f"{chain_node.name} spreads the heads of {node.name} over several dims"
                            if chain_node not in avoid else
                            f"{chain_node.name} combines the heads of {node.name} with a tensor that varies along them")
                return None
        return heads

    @staticmethod
    def _shared_dims(pending: Pending) -> dict[torch.fx.Node, set[int]]:
        avoid: dict[torch.fx.Node, set[int]] = {}
        for node, dims in pending.shared:
            avoid.setdefault(node, set()).update(dims)
        return avoid

    def resolve_chain(self, pending: Pending, space: ChannelSpace, element_map: np.ndarray) -> bool:
        """A part of a pending layout became ``space`` (element j is origin element ``element_map[j]``: q out
        of a fused qkv): every node of the chain gets a space along the dim that part varies on."""
        position_of = np.full(pending.origin.size, -1)
        position_of[element_map] = np.arange(element_map.size)
        avoid = self._shared_dims(pending)
        return all(self.chain_space(node, position_of[labels.numpy() - 1], space, avoid.get(node, ()))
                   for node, labels in zip(pending.chain, pending.chain_labels))

    def chain_space(self, node: torch.fx.Node, heads_at: np.ndarray, heads: ChannelSpace, avoid=()) -> bool:
        """Give ``node`` (on a chain that split channels over several dims) a space along the one dim its
        heads vary on, coupled to ``heads``; ``heads_at`` is the position of ``heads`` each element holds
        (-1: another input's). False where no single dim holds them, or where it is one of ``avoid``."""
        for dim in range(heads_at.ndim):
            if dim in avoid:
                continue
            per_slice = [np.unique(v[v >= 0])
                         for v in (np.take(heads_at, i, axis=dim) for i in range(heads_at.shape[dim]))]
            if any(v.size > 1 for v in per_slice) or heads_at.shape[dim] == 1:
                continue
            positions = [i for i, v in enumerate(per_slice) if v.size == 1]
            space = graph.space(node)
            if space is None:
                space = self.new_space(node, dim)
            elif space.dim != dim:
                return False
            self.couple(space, heads, np.array(positions), np.array([per_slice[i][0] for i in positions]))
            return True
        return False

    def claim(self, tensor: str, dim: int, space: ChannelSpace | None) -> None:
        """Axis ``dim`` of model tensor ``tensor`` runs over ``space``: a tensor read by several ops (a
        module called at several sites, a tied weight) couples the spaces each of them gives that axis,
        or freezes them where their widths differ."""
        if space is None:
            return
        first = self.tensor_claims.setdefault((self.canonical(tensor), dim), space)
        if first is space:
            return
        if first.size == space.size:
            self.couple(first, space)
        else:
            reason = f"{tensor} is used with {first.size} and {space.size} channels on dim {dim}"
            self.freeze(first, reason)
            self.freeze(space, reason)

    def canonical(self, name: str) -> str:
        """The first qualified name of the tensor ``name`` names (a tied weight has several)."""
        if self._canonical is None:
            first: dict[int, str] = {}
            self._canonical = {}
            for each, tensor in [*self.gm.named_parameters(remove_duplicate=False),
                                 *self.gm.named_buffers(remove_duplicate=False)]:
                self._canonical[each] = first.setdefault(id(tensor), each)
        return self._canonical.get(name, name)

    def freeze(self, space: ChannelSpace | None, reason: str) -> None:
        if space is not None and space.id not in self.frozen:
            self.frozen[space.id] = reason

    def mark_norm(self, *spaces: ChannelSpace) -> None:
        self.norm_coupled.update(s.id for s in spaces)

    # --- results ---------------------------------------------------------------------------------
    def finish(self) -> Analysis:
        """Group channels and spaces, write ``group_id``/``channel_index`` on every space."""
        for pending in list(self.pending.values()):
            self.freeze(pending.origin, f"its channel axis is split over several dims by {pending.origin_node.name}")
        checked = not self.nests
        while True:  # a nest that is no pair of free groups joins its two sides into one group, as a coupling does
            groups = self._grouped(check_widths=checked)
            nests, coupled = self._nests(groups)
            for inner, outer, parent in coupled:
                self.couple(inner, outer, None, parent)
            self.nests = [n for n in self.nests if not any(n is c for c in coupled)]
            if checked and not coupled:
                return Analysis(groups=groups, spaces=self.spaces, nests=nests)
            checked = True

    def _nests(self, groups: dict[int, ChannelGroup]) -> tuple[list[Nest], list]:
        """The recorded nests that join two prunable groups, one inner channel per inner position and one outer
        channel per outer position; and the rest, which are coupled instead."""
        nests: list[Nest] = []
        coupled = []
        used: set[int] = set()
        for inner, outer, parent in self.nests:
            g_in, g_out = groups[inner.group_id], groups[outer.group_id]
            separate = g_in.id != g_out.id and not used.intersection((g_in.id, g_out.id))
            whole = all(g.prunable and g.fixed is None for g in (g_in, g_out))
            one_each = np.unique(inner.group_channels).size == inner.size == g_in.size and \
                np.unique(outer.group_channels).size == outer.size == g_out.size
            if not (separate and whole and one_each):
                coupled.append((inner, outer, parent))
                continue
            by_channel = np.empty(g_in.size, dtype=np.int64)
            by_channel[inner.group_channels] = outer.group_channels[parent]
            nests.append(Nest(g_in.id, g_out.id, by_channel))
            used.update((g_in.id, g_out.id))
        return nests, coupled

    def _grouped(self, check_widths: bool = True) -> dict[int, ChannelGroup]:
        """Connected components of the couplings: the groups, with every space's ``group_id``/``channel_index``
        (``check_widths``: and the widths read at run time checked against them, which may freeze spaces)."""
        n = self.num_elements
        if self.edges_a:
            rows = np.concatenate(self.edges_a)
            cols = np.concatenate(self.edges_b)
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        adjacency = scipy.sparse.coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
        _, element_label = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
        groups: dict[int, ChannelGroup] = {}
        components = sorted(nx.connected_components(self.space_graph), key=min)
        if check_widths:
            self._check_width_uses({i: k for k, comp in enumerate(components) for i in comp})
        for group_id, component in enumerate(components):
            members = [self.spaces[i] for i in sorted(component)]
            labels = [element_label[self.base[s.id]: self.base[s.id] + s.size] for s in members]
            widest = max(range(len(members)), key=lambda k: (len(np.unique(labels[k])), -k))
            order = [labels[widest]] + labels[:widest] + labels[widest + 1:]
            _, first = np.unique(np.concatenate(order), return_index=True)
            unique_in_order = np.concatenate(order)[np.sort(first)]
            sorter = np.argsort(unique_in_order)
            for space, lab in zip(members, labels):
                space.group_id = group_id
                space.channel_index = sorter[np.searchsorted(unique_in_order, lab, sorter=sorter)].astype(np.int64)
            reasons = [self.frozen[s.id] for s in members if s.id in self.frozen]
            reason = "; ".join(dict.fromkeys(reasons)) if reasons else None
            # a frozen space keeps its own channels, not the whole group's: the rest may go
            fixed = np.unique(np.concatenate([s.channel_index for s in members if s.id in self.frozen] or
                                             [np.zeros(0, dtype=np.int64)]))
            partly = 0 < fixed.size < len(unique_in_order)
            groups[group_id] = ChannelGroup(
                id=group_id,
                size=len(unique_in_order),
                members=[GroupMember(s.node, s.dim, s.size) for s in members],
                frozen_reason=None if partly else reason,
                norm_coupled=any(s.id in self.norm_coupled for s in members),
                fixed=fixed if partly else None,
                fixed_reason=reason if partly else None,
            )
        return groups

    def _check_width_uses(self, component_of: dict[int, int]) -> None:
        """A width read at run time must still be right after pruning, or its group is frozen.

        It is right when it sets the size of an axis in the same group with the same width, or when the
        shape op that uses it is replaced by a gather. When it sets the size of an untracked axis (whose
        width never changes, e.g. the output of an attention einsum), the traced literal is written
        back instead. Any other use (arithmetic, asserts, factories) freezes the measured group, and
        the group of the axis it sizes, if any: that axis must keep the measured width.
        """
        for measured, target, user, position in self.width_uses:
            if user in self.replaced_chains:
                continue  # the rewrite replaces this shape op with a gather
            if target is not None and component_of[target.id] == component_of[measured.id] \
                    and target.size == measured.size:
                continue
            if position is not None and target is None and self._fixed_width(user, position):
                self.info(user).notes.setdefault("literal_sizes", {})[position] = self.tensor_shape(user)[position]
                continue
            if target is not None and position is not None and target.dim == position \
                    and measured.id not in self.frozen:
                # it sizes another group's axis (timm's pvt_v2: sr(x).reshape(B, C, -1), an attention's merged
                # heads reshaped to the stream's width): that axis keeps its width and gets the traced number
                # back, and the measured group stays free
                self.freeze(target, f"{user.name} sizes it with the width of another group, read at run time")
                self.info(user).notes.setdefault("literal_sizes", {})[position] = self.tensor_shape(user)[position]
                continue
            self.freeze(measured, f"its width is read at run time and used by {user.name}")
            if target is not None:  # the axis it sizes must keep that width too
                self.freeze(target, f"{user.name} sizes it with the width of another group, read at run time")

    def _fixed_width(self, node: torch.fx.Node, dim: int) -> bool:
        """True when axis ``dim`` of ``node``'s output can never change width: untracked, or frozen (a frozen
        space keeps its own positions)."""
        space = graph.space(node)
        if node in self.pending:
            return False
        return space is None or space.dim != dim or space.id in self.frozen
