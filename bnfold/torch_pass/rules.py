"""The fold rules of the PyTorch pass: one small unit per pattern, on the protocol of ``bnfold.rule``.

A rule's ``match(ctx, bn)`` (``bn``: the BN module's path and its one call) returns a ``Match`` (the
modules that absorb the BN and the edits, ``plan.Edit``, that do it) or raises ``NoMatch`` with the
reason (``applies=False``, not reported, when the pattern is not there at all).

Applying a match is data too: every edit says "this BN's (s, t), channels a:b, each repeated k times,
onto target's output channels (backward) or input channels (forward)"; ``fold._apply`` runs them
through ``fold_math`` in float64 and casts once. Adding a rule means one class here (plus its test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from bnfold.plan import IDENTITY_BRANCH, Edit, Folded, FoldPlan
from bnfold.rule import NoMatch, Rule
from bnfold.torch_pass import bn_kinds
from bnfold.torch_pass.graph import Call, Graph


@dataclass(frozen=True)
class BN:
    """The BatchNorm module being folded: its path in the model and its one call in the graph."""

    path: str
    call: Call


@dataclass
class Match:
    """``into``: the modules that absorb the BN; ``edits``: how; ``rule``: the name the plan gives
    the fold when it is not the rule's own (forward through a pool → "pool-head")."""

    into: list[str]
    edits: list[Edit]
    rule: str | None = None


@dataclass
class Context:
    """The traced model, its tied parameters, and the plan so far: ``plan.edits`` (what already
    folded where) and ``taken`` ((target, op) → the BN whose fold it already takes)."""

    g: Graph
    model: nn.Module
    shared: dict[int, list[str]]
    plan: FoldPlan = field(default_factory=FoldPlan)
    taken: dict[tuple[str, str], str] = field(default_factory=dict)
    _mods: dict = field(default_factory=dict)

    def module(self, path: str) -> nn.Module:
        if path not in self._mods:
            self._mods[path] = self.model.get_submodule(path)
        return self._mods[path]

    def check_untied(self, path: str, role: str) -> None:
        """NoMatch when the weight or bias of module ``path`` (the ``role``) is shared with another."""
        mod = self.module(path)
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter) and len(self.shared.get(id(p), [])) > 1:
                others = [n for n in self.shared[id(p)] if n != f"{path}.{pname}"]
                raise NoMatch(f"{role} `{path}`: its {pname} is shared with {', '.join(others)}")

    def channels(self, bn_path: str) -> int:
        return self.module(bn_path).running_mean.numel()

    def producer(self, node, role: str = "producer") -> str:
        """The path of the producer call whose output ``node`` is, when a backward fold may rewrite
        it (its only data consumer is the one asking); else NoMatch with the reason."""
        g = self.g
        own = g.owner(node)
        if own is None:
            raise NoMatch(f"its input comes from {g.what(node)}, not from a Conv/Linear module")
        path = own[0]
        mod = self.module(path)
        kind, why = bn_kinds.producer_kind(mod)
        if kind is None:
            if why:
                raise NoMatch(f"{role} `{path}` ({type(mod).__name__}) overrides forward()")
            raise NoMatch(f"its input comes from {type(mod).__name__} `{path}`, not from a Conv/Linear")
        if kind.backward:
            raise NoMatch(f"{role} `{path}` ({type(mod).__name__}) {kind.backward}")
        if len(g.calls[path]) != 1:
            raise NoMatch(f"{role} `{path}` is called {len(g.calls[path])} times (its weights serve every call)")
        consumers = g.data_users(node, own)
        if len(consumers) != 1:
            raise NoMatch(f"{role} `{path}`'s output has {len(consumers)} consumers")
        self.check_untied(path, role)
        return path

    def check_free(self, rule: Rule, m: Match) -> None:
        """NoMatch when a target of ``m`` already takes another BN's fold the same way."""
        clash = next((self.taken[(e.target, e.op)] for e in m.edits if (e.target, e.op) in self.taken), None)
        if clash:
            raise NoMatch(f"its target already takes the fold of `{clash}`")

    def record(self, bn: BN, rule: Rule, m: Match) -> None:
        """Add the fold to the plan; its targets are taken (identity branches add up: several may
        join one conv, the first one named)."""
        for e in m.edits:
            self.taken.setdefault((e.target, e.op), bn.path)
        self.plan.edits.extend(m.edits)
        into_type = [type(self.module(t)).__name__ for t in m.into]
        self.plan.folded.append(Folded(bn.path, list(m.into), m.rule or rule.name, into_type))


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# ----------------------------------------------------------------------------------------- rules
class Backward(Rule):
    """Conv/ConvTranspose/Linear → BN: scale the producer's output channels."""

    name = "backward"

    def match(self, ctx: Context, bn: BN) -> Match:
        call = bn.call
        if len(call.inputs) != 1:
            raise NoMatch(f"BN has {len(call.inputs)} activation inputs")
        path = ctx.producer(call.inputs[0])
        prod = ctx.module(path)
        if isinstance(prod, nn.Linear):
            if call.rank_in is None:
                raise NoMatch("Linear → BN needs example inputs to check the Linear output is (N, C)")
            if call.rank_in != 2:
                raise NoMatch(f"Linear `{path}` output has rank {call.rank_in}; BatchNorm1d normalises dim 1, not the Linear's features")
        out_ch = bn_kinds.out_channels(prod)
        if out_ch != ctx.channels(bn.path):
            raise NoMatch(f"producer `{path}` has {out_ch} output channels, BN has {ctx.channels(bn.path)}")
        return Match([path], [Edit(path, "backward", bn.path)])


class Concat(Rule):
    """cat([producer₁, …, producerₖ], dim=1) → BN, each producer feeding only the cat: slice by slice."""

    name = "concat"

    def match(self, ctx: Context, bn: BN) -> Match:
        g, call = ctx.g, bn.call
        if len(call.inputs) != 1 or g.op_name(call.inputs[0]) not in ("cat", "concat", "concatenate"):
            raise NoMatch("the BN's input is no concatenation", applies=False)
        cat = call.inputs[0]
        tensors = _arg(cat, 0, "tensors")
        dim = _arg(cat, 1, "dim", 0)
        rank = g.rank(cat)
        if isinstance(dim, int) and dim < 0 and rank is not None:
            dim += rank
        if dim != 1:
            raise NoMatch(f"the concat joins dim {dim}, not the channels (dim 1)")
        if len(g.data_users(cat)) != 1:
            raise NoMatch(f"the concat output has {len(g.data_users(cat))} consumers")
        if not isinstance(tensors, (list, tuple)) or len(set(tensors)) != len(tensors):
            raise NoMatch("the concat repeats an input (one producer would need two scales)")
        into, edits, off = [], [], 0
        for t in tensors:
            path = ctx.producer(t, role="concatenated producer")
            prod = ctx.module(path)
            if isinstance(prod, nn.Linear) and rank != 2:
                raise NoMatch(f"Linear `{path}` in the concat: output rank {rank}, not (N, C)")
            n = bn_kinds.out_channels(prod)
            into.append(path)
            edits.append(Edit(path, "backward", bn.path, (off, off + n)))
            off += n
        if off != ctx.channels(bn.path):
            raise NoMatch(f"the concatenated producers give {off} channels, BN has {ctx.channels(bn.path)}")
        return Match(into, edits)


_RESHAPES = {"flatten", "reshape", "view", "_unsafe_view", "reshape_as", "view_as"}


class Reshape(Rule):
    """Linear → reshape to (N·T, C) keeping the feature axis → BatchNorm1d: rows of W by s."""

    name = "reshape"

    def match(self, ctx: Context, bn: BN) -> Match:
        g, call = ctx.g, bn.call
        r = call.inputs[0] if len(call.inputs) == 1 else None
        if r is None or (g.op_name(r) not in _RESHAPES and not isinstance(g.module_of(r), nn.Flatten)):
            raise NoMatch("the BN's input is no reshape", applies=False)
        src = r.all_input_nodes[0] if r.all_input_nodes else None
        if src is None or g.owner(src) is None:  # the backward reason says what feeds the BN
            raise NoMatch("no producer behind the reshape", applies=False)
        out_shape, in_shape = g.shape(r), g.shape(src)
        if out_shape is None or in_shape is None:
            raise NoMatch("reshape between producer and BN: needs example inputs to check the feature axis")
        if len(out_shape) != 2 or len(in_shape) < 2 or in_shape[-1] != out_shape[1]:
            raise NoMatch(f"the reshape {list(in_shape)} → {list(out_shape)} does not keep the producer's last axis as the BN's channels")
        if len(g.data_users(r)) != 1:
            raise NoMatch(f"the reshape output has {len(g.data_users(r))} consumers")
        path = ctx.producer(src)
        prod = ctx.module(path)
        if not isinstance(prod, nn.Linear):
            raise NoMatch(f"producer `{path}` is {type(prod).__name__}: its channels are not the last axis")
        if prod.out_features != ctx.channels(bn.path):
            raise NoMatch(f"Linear `{path}` has {prod.out_features} features, BN has {ctx.channels(bn.path)}")
        return Match([path], [Edit(path, "backward", bn.path)])


_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
_NOOPS = {"contiguous", "clone", "detach"}


def _passthrough(g: Graph, u, x, rank: int | None, repeat: int):
    """How a node between BN and its consumer maps per-channel affine data, as (kind, rank, repeat);
    None when it is no such node; NoMatch when it is one but breaks exactness."""
    mod = g.module_of(u)
    if mod is not None:
        if isinstance(mod, bn_kinds.EVAL_IDENTITY):
            return ("dropout", rank, repeat)
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return ("pool", rank, repeat)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
            if any(pad) or mod.ceil_mode:
                raise NoMatch(f"{type(mod).__name__} `{u.target}` pads or uses ceil_mode (border averages see zeros)")
            return ("pool", rank, repeat)
        if isinstance(mod, nn.Flatten):
            return _flatten(g, u, x, rank, repeat, mod.start_dim, mod.end_dim)
        return None
    name = g.op_name(u)
    if name is None or not u.all_input_nodes or u.all_input_nodes[0] is not x:
        return None
    if name in _DROPOUTS and _arg(u, 2, "training", _arg(u, 2, "train", True)) is not False:
        raise NoMatch(f"`{name}` runs in training mode")
    if name in _DROPOUTS or name in _NOOPS:
        return ("dropout", rank, repeat)
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d"):
        return ("pool", rank, repeat)
    if name == "mean":
        dims = _arg(u, 1, "dim")
        keep = _arg(u, 2, "keepdim", False)
        if dims is None:
            raise NoMatch("`mean` over every axis mixes channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise NoMatch("`mean` over axes computed at run time")
        if rank is None and any(d < 0 for d in dims):
            raise NoMatch("`mean` over negative axes: needs example inputs to know the rank")
        dims = [d + rank if d < 0 else d for d in dims]
        if any(d < 2 for d in dims):
            raise NoMatch(f"`mean` over axes {dims} includes the batch or channel axis")
        return ("pool", None if rank is None else (rank if keep else rank - len(dims)), repeat)
    if name == "flatten":
        return _flatten(g, u, x, rank, repeat, _arg(u, 1, "start_dim", 0), _arg(u, 2, "end_dim", -1))
    if name in ("reshape", "view"):
        ins, outs = g.shape(x), g.shape(u)
        if ins is None or outs is None:
            raise NoMatch(f"`{name}` after the BN: needs example inputs to check the channel axis")
        if len(outs) == 2 and outs[0] == ins[0] and outs[1] == math.prod(ins[1:]):
            return ("pool", 2, repeat * math.prod(ins[2:]))
        raise NoMatch(f"`{name}` {list(ins)} → {list(outs)} moves the channel axis")
    return None


def _flatten(g: Graph, u, x, rank, repeat, start, end):
    if not isinstance(start, int) or not isinstance(end, int):
        raise NoMatch("flatten with axes computed at run time")
    ins = g.shape(x)
    if ins is None:
        raise NoMatch("flatten after the BN: needs example inputs to know the spatial size")
    end = end + len(ins) if end < 0 else end
    start = start + len(ins) if start < 0 else start
    if 2 <= start <= end:  # spatial axes merged (x.flatten(2).mean(-1)): the channel axis stays
        return ("flatten", len(ins) - (end - start), repeat)
    if start != 1 or end != len(ins) - 1:
        raise NoMatch(f"flatten({start}, {end}) does not keep the batch axis and channels first")
    return ("pool", 2, repeat * math.prod(ins[2:]))


class Forward(Rule):
    """BN → (dropout, identity, average pool / mean, flatten) → unpadded Conv or Linear: scale the
    consumer's input channels and push the shift through its weights ("pool-head" when a pool or
    flatten sits between)."""

    name = "forward"

    def match(self, ctx: Context, bn: BN) -> Match:
        mod = ctx.module(bn.path)
        if not bn_kinds.remainder_is_identity(mod):
            act = getattr(mod, "act", None)
            raise NoMatch(f"{type(mod).__name__} applies {type(act).__name__ if act is not None else 'more'} after normalising")
        if len(bn.call.outputs) != 1:
            raise NoMatch("BN output is not a single value")
        cpaths, node, rank, repeat, crossed = _walk_to_consumer(ctx.g, bn.call)
        for cpath in cpaths:  # several heads (a distillation head beside the classifier): each takes the fold
            _check_consumer(ctx, bn, cpath, node, rank, repeat)
        rule = "pool-head" if any(k == "pool" for k, _ in crossed) else None
        return Match(list(cpaths), [Edit(c, "forward", bn.path, None, repeat) for c in cpaths], rule)


def _walk_to_consumer(g: Graph, call: Call):
    """From the BN's output through pass-through nodes to the module calls reading it: (their paths,
    the node they read, that node's rank, each channel's repeat, the nodes crossed). Several
    readers are fine when every one is a module call (pool → classifier and distillation heads)."""
    node = call.outputs[0]
    own = g.owner(node)
    rank = g.rank(node) if g.rank(node) is not None else call.rank_in
    repeat, crossed = 1, []
    while True:
        users = g.data_users(node, own)
        if len(users) != 1 or g.owner(users[0]) is not None:
            where = "BN output" if not crossed else f"the `{crossed[-1][1]}` after the BN"
            others = [g.what(u) for u in users if g.owner(u) is None]
            paths = [g.owner(u)[0] for u in users if g.owner(u) is not None]
            if not users or others or len(set(paths)) != len(paths):
                why = f" ({others[0]} is not a Conv/Linear module)" if others else " (one module reads it twice)" if users else ""
                raise NoMatch(f"{where} has {len(users)} consumers{why}")
            return paths, node, rank, repeat, crossed
        u = users[0]
        step = _passthrough(g, u, node, rank, repeat)
        if step is None:
            raise NoMatch(f"BN output goes to {g.what(u)}, not to a Conv/Linear module")
        kind_, rank, repeat = step
        crossed.append((kind_, g.what(u).strip("`")))
        node, own = u, None


def _check_consumer(ctx: Context, bn: BN, cpath: str, node, rank: int | None, repeat: int) -> None:
    """NoMatch unless module ``cpath``, reading ``node`` (the BN's output, each channel repeated
    ``repeat`` times), can take a forward fold exactly."""
    g, cons = ctx.g, ctx.module(cpath)
    pk, why = bn_kinds.producer_kind(cons)
    if pk is None:
        if why:
            raise NoMatch(f"consumer `{cpath}` ({type(cons).__name__}) overrides forward()")
        raise NoMatch(f"BN output goes to {type(cons).__name__} `{cpath}`")
    if bn_kinds.is_transposed(cons):
        raise NoMatch(f"consumer `{cpath}` is a ConvTranspose (border outputs see part of the kernel: the shift would not be exact)")
    if pk.forward:
        raise NoMatch(f"consumer `{cpath}` ({type(cons).__name__}) {pk.forward}")
    if len(g.calls[cpath]) != 1:
        raise NoMatch(f"consumer `{cpath}` is called {len(g.calls[cpath])} times")
    if next(iter(g.calls[cpath].values())).inputs != [node]:
        raise NoMatch(f"consumer `{cpath}` reads other inputs too")
    if bn_kinds.is_conv(cons):
        if _has_padding(cons):
            raise NoMatch(f"consumer `{cpath}` pads its input (padding={cons.padding}); padded zeros never went through the BN")
        if repeat != 1:
            raise NoMatch(f"consumer `{cpath}` reads a flattened BN output")
    elif isinstance(cons, nn.Linear):
        if rank is None:
            raise NoMatch("BN → Linear needs example inputs to check the BN input is (N, C)")
        if rank != 2:
            raise NoMatch(f"BN input has rank {rank}; the Linear `{cpath}` does not read channels on dim 1")
        if cons.in_features != ctx.channels(bn.path) * repeat:
            raise NoMatch(f"Linear `{cpath}` reads {cons.in_features} features, the BN gives {ctx.channels(bn.path)}×{repeat}")
    else:
        raise NoMatch(f"BN output goes to {type(cons).__name__} `{cpath}`")
    ctx.check_untied(cpath, "consumer")


def _has_padding(conv: nn.Module) -> bool:
    if conv.padding == "same":  # pads unless every (dilated) kernel extent is 1
        return any((k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation))
    return conv.padding != "valid" and any(p != 0 for p in conv.padding)


_ADDS = {"add", "iadd", "add_", "sub", "isub", "sub_"}


def is_sum(g: Graph, n) -> bool:
    """A plain sum of tensors (x + y, x += y, torch.add without alpha) or an eval-time identity."""
    mod = g.module_of(n)
    if mod is not None:
        return isinstance(mod, bn_kinds.EVAL_IDENTITY)
    return g.op_name(n) in _ADDS and "alpha" not in n.kwargs and len(n.args) <= 2 and g.owner(n) is None


def strip_identity(g: Graph, n):
    """The value behind eval-time identity modules (nn.Identity, Dropout)."""
    while isinstance(g.module_of(n), bn_kinds.EVAL_IDENTITY) and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


def sum_root(g: Graph, n):
    """The last node of the sum that node ``n`` (a sum) belongs to: the sum runs up through nodes
    that only add (or subtract) into the next one."""
    while len(up := g.data_users(n)) == 1 and is_sum(g, up[0]):
        n = up[0]
    return n


def sum_terms(g: Graph, root) -> list[tuple]:
    """The terms of the sum ending at ``root``, as (node, ±1): the sum is Σ sign·leaf."""
    leaves: list = []

    def expand(n, sign):
        if n is not root and (not is_sum(g, n) or len(g.data_users(n)) != 1):
            leaves.append((n, sign))
            return
        if g.op_name(n) in ("sub", "isub", "sub_"):
            if not all(isinstance(a, type(n)) for a in n.args):  # x - 1: a constant operand, not a branch
                leaves.append((n, sign))
                return
            expand(n.args[0], sign)
            expand(n.args[1], -sign)
            return
        for a in n.all_input_nodes:
            expand(a, sign)

    expand(root, 1)
    return leaves


class IdentityBranch(Rule):
    """x → BN summed with conv branches on the same x (RepVGG, MobileOne, RepViT, …): BN(x) is a
    conv with s at the centre tap and bias t, added to one conv branch (stride 1, centred padding,
    in = out channels). Runs after the first pass: the conv's own BN must already fold into it
    (``ctx.plan``); the BN becomes a zero branch."""

    name = IDENTITY_BRANCH

    def match(self, ctx: Context, bn: BN) -> Match:
        g, call = ctx.g, bn.call
        if len(call.inputs) != 1 or len(call.outputs) != 1:
            raise NoMatch("the BN is not one value in, one out", applies=False)
        x, o = strip_identity(g, call.inputs[0]), call.outputs[0]  # RepGhost: bn(Identity()(x1)) is a branch on x1
        users = g.data_users(o)
        if len(users) != 1 or not is_sum(g, users[0]) or g.module_of(users[0]) is not None:
            raise NoMatch("the BN's output is not summed", applies=False)
        if not bn_kinds.remainder_is_identity(ctx.module(bn.path)):
            raise NoMatch(f"{type(ctx.module(bn.path)).__name__} applies an activation before the sum")
        leaves = sum_terms(g, sum_root(g, users[0]))  # the terms of the sum that o enters
        mine = [s for n, s in leaves if n is o]
        if len(mine) != 1:
            raise NoMatch("the BN branch enters the sum more than once")
        reasons = []
        for leaf, sign in leaves:
            if leaf is o or g.owner(leaf) is None:
                continue
            try:
                path = self._branch_conv(ctx, leaf, x, bn)
            except NoMatch as nm:
                reasons.append(nm.reason)
                continue
            if path is not None:
                return Match([path], [Edit(path, "identity", bn.path, sign=mine[0] * sign)])
        raise NoMatch("; ".join(reasons) if reasons else "no conv branch on the same input in the sum")

    @classmethod
    def _branch_conv(cls, ctx: Context, leaf, x, bn: BN) -> str | None:
        """The conv of the sum term ``leaf`` that can take the BN branch: ``leaf`` itself, or the conv
        under a BN that already folded backward into it; None when the term is neither."""
        g = ctx.g
        path = g.owner(leaf)[0]
        if len(g.data_users(leaf, g.owner(leaf))) != 1:
            raise NoMatch(f"branch `{path}`'s output is used outside the sum")
        mod = ctx.module(path)
        if bn_kinds.is_batchnorm(mod):  # conv → BN branch: the BN must have folded into the conv
            lcall = next(iter(g.calls[path].values()))
            if not bn_kinds.remainder_is_identity(mod) or len(lcall.inputs) != 1:
                return None
            src_own = g.owner(lcall.inputs[0])
            if src_own is None or not any(e.op == "backward" and (e.target, e.bn) == (src_own[0], path) for e in ctx.plan.edits):
                return None
            path = src_own[0]
            mod = ctx.module(path)
        cls._check_conv(ctx, path, mod, x, bn.path)
        return path

    @staticmethod
    def _check_conv(ctx: Context, path: str, mod: nn.Module, x, bn: str) -> None:
        """NoMatch unless conv ``path`` reads ``x`` alone and can take an identity branch exactly."""
        g = ctx.g
        pk, _ = bn_kinds.producer_kind(mod)
        if pk is None or not bn_kinds.is_conv(mod) or pk.backward or pk.forward:
            raise NoMatch(f"branch `{path}` ({type(mod).__name__}) is not a plain Conv")
        calls = g.calls[path]
        cin = next(iter(calls.values())).inputs
        if len(calls) != 1 or len(cin) != 1 or strip_identity(g, cin[0]) is not x:
            raise NoMatch(f"branch `{path}` does not read the BN's input alone")
        c = ctx.channels(bn)
        if mod.in_channels != c or mod.out_channels != c:
            raise NoMatch(f"branch `{path}` maps {mod.in_channels}→{mod.out_channels} channels, the BN has {c}")
        if any(s != 1 for s in mod.stride):
            raise NoMatch(f"branch `{path}` has stride {mod.stride}")
        if any(k % 2 == 0 for k in mod.kernel_size):
            raise NoMatch(f"branch `{path}` kernel {mod.kernel_size} has no centre tap")
        centred = tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation))
        if bn_kinds.padding(mod) != centred:  # 'same', 'valid' (a 1×1) and numbers alike
            raise NoMatch(f"branch `{path}` padding {mod.padding} does not centre the kernel (needs {centred})")
        ctx.check_untied(path, "branch")


class SumOfBranches(Rule):
    """BN after a sum of conv branches on one input x, with at most one plain skip (RepViT's
    ``bn(conv(x) + conv1(x) + x)``): s·(Σ convᵢ(x) + x) + t = (s·conv₁(x) + t) + Σ s·convᵢ(x) + x
    + (s − 1)·x. The first conv takes (s, t), the others (s, 0), and the skip, which stays in the
    module's forward, adds (s − 1)·x to a conv reading x alone at its centre tap (the identity-branch
    conditions). A branch's own BN folds into its conv first. Runs after the first pass."""

    name = "sum"

    def match(self, ctx: Context, bn: BN) -> Match:
        g, call = ctx.g, bn.call
        if len(call.inputs) != 1 or not is_sum(g, call.inputs[0]) or g.module_of(call.inputs[0]) is not None:
            raise NoMatch("the BN's input is no sum", applies=False)
        root = call.inputs[0]
        if len(g.data_users(root)) != 1:
            raise NoMatch(f"the sum has {len(g.data_users(root))} consumers")
        convs, others = [], []
        for leaf, sign in sum_terms(g, root):
            if sign != 1:
                raise NoMatch("the sum subtracts a branch")
            try:
                convs.append(self._branch(ctx, leaf, bn))
            except NoMatch as nm:
                others.append((strip_identity(g, leaf), nm.reason))
        inputs = {strip_identity(g, i) for p in convs for c in g.calls[p].values() for i in c.inputs}
        bad = [why for x, why in others if x not in inputs]  # a term that is neither a conv branch nor a skip
        if bad or not convs or len(others) > 1:
            raise NoMatch(bad[0] if bad else f"the sum has {len(convs)} conv branches and {len(others)} skips (at most one)")
        edits = [Edit(p, "backward", bn.path, affine="st" if k == 0 else "s") for k, p in enumerate(convs)]
        if others:  # the one skip
            target = next((p for p in convs if self._reads_alone(ctx, p, others[0][0], bn)), None)
            if target is None:
                raise NoMatch("no conv branch reads the skip's input alone with stride 1 and centred padding")
            edits.append(Edit(target, "identity", bn.path, affine="s-1"))
        return Match(list(dict.fromkeys(convs)), edits)

    @staticmethod
    def _branch(ctx: Context, leaf, bn: BN) -> str:
        """The conv of sum term ``leaf``: the producer itself, or the conv its own BN folded into."""
        g = ctx.g
        if g.owner(leaf) is None:
            raise NoMatch(f"{g.what(leaf)} in the sum is not a conv branch")
        path = g.owner(leaf)[0]
        mod = ctx.module(path)
        if bn_kinds.is_batchnorm(mod):
            into = [e.target for e in ctx.plan.edits if e.bn == path and e.op == "backward" and e.sl is None and e.affine == "st"]
            if not bn_kinds.remainder_is_identity(mod) or len(into) != 1:
                raise NoMatch(f"branch BN `{path}` is not folded into the conv of its branch")
            if len(g.data_users(leaf, g.owner(leaf))) != 1:
                raise NoMatch(f"branch `{path}`'s output is used outside the sum")
            path = into[0]
        else:
            path = ctx.producer(leaf, role="branch")
        if bn_kinds.out_channels(ctx.module(path)) != ctx.channels(bn.path):
            raise NoMatch(f"branch `{path}` has {bn_kinds.out_channels(ctx.module(path))} output channels, BN has {ctx.channels(bn.path)}")
        return path

    @staticmethod
    def _reads_alone(ctx: Context, path: str, x, bn: BN) -> bool:
        try:
            IdentityBranch._check_conv(ctx, path, ctx.module(path), x, bn.path)
        except NoMatch:
            return False
        return True


# The order is the preference: a backward fold keeps the consumer's padding question out of it.
RULES = [Backward(), Concat(), Reshape(), Forward()]
# Rules that read the first pass's folds.
LATE_RULES = [IdentityBranch(), SumOfBranches()]
