"""The fold rules: one small unit per pattern.

Each rule has a ``name`` and ``match(ctx, bn_path, call)`` returning

* ``None`` when the pattern does not apply at all (e.g. ``concat`` on a BN whose input is no cat),
* ``Reject(reason)`` when it applies but is not exact here, or
* ``Match(into, edits)``: the modules that absorb the BN and the edits (``plan.Edit``) that do it.

Applying a match is data too: every edit says "this BN's (s, t), channels a:b, each repeated k times,
onto target's output channels (backward) or input channels (forward)"; ``fold._apply`` runs them
through ``fold_math`` in float64 and casts once. Adding a rule means one class here (plus its test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from bnfold.plan import Edit
from bnfold.torch_pass import bn_kinds
from bnfold.torch_pass.graph import Call, Graph


@dataclass
class Match:
    into: list[str]
    edits: list[Edit]
    rule: str | None = None  # overrides the rule's name (forward through a pool → "pool-head")


@dataclass
class Reject:
    reason: str


@dataclass
class Context:
    g: Graph
    model: nn.Module
    shared: dict[int, list[str]]
    _mods: dict = field(default_factory=dict)

    def module(self, path: str) -> nn.Module:
        if path not in self._mods:
            self._mods[path] = self.model.get_submodule(path)
        return self._mods[path]

    def tied(self, path: str) -> str | None:
        mod = self.module(path)
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter) and len(self.shared.get(id(p), [])) > 1:
                others = [n for n in self.shared[id(p)] if n != f"{path}.{pname}"]
                return f"its {pname} is shared with {', '.join(others)}"
        return None

    def channels(self, bn_path: str) -> int:
        return self.module(bn_path).running_mean.numel()

    def producer(self, node, role: str = "producer") -> tuple[str | None, str | None]:
        """(path, None) when ``node`` is the output of a producer call that a backward fold may
        rewrite (its only data consumer is the one asking), else (None, reason)."""
        g = self.g
        own = g.owner(node)
        if own is None:
            return None, f"its input comes from {g.what(node)}, not from a Conv/Linear module"
        path = own[0]
        mod = self.module(path)
        kind, why = bn_kinds.producer_kind(mod)
        if kind is None:
            if why:
                return None, f"{role} `{path}` ({type(mod).__name__}) overrides forward()"
            return None, f"its input comes from {type(mod).__name__} `{path}`, not from a Conv/Linear"
        if kind.backward:
            return None, f"{role} `{path}` ({type(mod).__name__}) {kind.backward}"
        if len(g.calls[path]) != 1:
            return None, f"{role} `{path}` is called {len(g.calls[path])} times (its weights serve every call)"
        consumers = g.data_users(node, own)
        if len(consumers) != 1:
            return None, f"{role} `{path}`'s output has {len(consumers)} consumers"
        tied = self.tied(path)
        if tied:
            return None, f"{role} `{path}`: {tied}"
        return path, None


def _arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# ----------------------------------------------------------------------------------------- rules
class Backward:
    """Conv/ConvTranspose/Linear → BN: scale the producer's output channels."""

    name = "backward"

    def match(self, ctx: Context, bn: str, call: Call):
        if len(call.inputs) != 1:
            return Reject(f"BN has {len(call.inputs)} activation inputs")
        path, why = ctx.producer(call.inputs[0])
        if why:
            return Reject(why)
        prod = ctx.module(path)
        if isinstance(prod, nn.Linear):
            if call.rank_in is None:
                return Reject("Linear → BN needs example inputs to check the Linear output is (N, C)")
            if call.rank_in != 2:
                return Reject(f"Linear `{path}` output has rank {call.rank_in}; BatchNorm1d normalises dim 1, not the Linear's features")
        out_ch = bn_kinds.out_channels(prod)
        if out_ch != ctx.channels(bn):
            return Reject(f"producer `{path}` has {out_ch} output channels, BN has {ctx.channels(bn)}")
        return Match([path], [Edit(path, "backward", bn)])


class Concat:
    """cat([producer₁, …, producerₖ], dim=1) → BN, each producer feeding only the cat: slice by slice."""

    name = "concat"

    def match(self, ctx: Context, bn: str, call: Call):
        g = ctx.g
        if len(call.inputs) != 1 or g.op_name(call.inputs[0]) not in ("cat", "concat", "concatenate"):
            return None
        cat = call.inputs[0]
        tensors = _arg(cat, 0, "tensors")
        dim = _arg(cat, 1, "dim", 0)
        rank = g.rank(cat)
        if isinstance(dim, int) and dim < 0 and rank is not None:
            dim += rank
        if dim != 1:
            return Reject(f"the concat joins dim {dim}, not the channels (dim 1)")
        if len(g.data_users(cat)) != 1:
            return Reject(f"the concat output has {len(g.data_users(cat))} consumers")
        if not isinstance(tensors, (list, tuple)) or len(set(tensors)) != len(tensors):
            return Reject("the concat repeats an input (one producer would need two scales)")
        into, edits, off = [], [], 0
        for t in tensors:
            path, why = ctx.producer(t, role="concatenated producer")
            if why:
                return Reject(why)
            prod = ctx.module(path)
            if isinstance(prod, nn.Linear) and rank != 2:
                return Reject(f"Linear `{path}` in the concat: output rank {rank}, not (N, C)")
            n = bn_kinds.out_channels(prod)
            into.append(path)
            edits.append(Edit(path, "backward", bn, (off, off + n)))
            off += n
        if off != ctx.channels(bn):
            return Reject(f"the concatenated producers give {off} channels, BN has {ctx.channels(bn)}")
        return Match(into, edits)


_RESHAPES = {"flatten", "reshape", "view", "_unsafe_view", "reshape_as", "view_as"}


class Reshape:
    """Linear → reshape to (N·T, C) keeping the feature axis → BatchNorm1d: rows of W by s."""

    name = "reshape"

    def match(self, ctx: Context, bn: str, call: Call):
        g = ctx.g
        if len(call.inputs) != 1:
            return None
        r = call.inputs[0]
        mod = g.module_of(r)
        if g.op_name(r) not in _RESHAPES and not isinstance(mod, nn.Flatten):
            return None
        src = r.all_input_nodes[0] if r.all_input_nodes else None
        if src is None or g.owner(src) is None:
            return None  # no producer behind the reshape: the backward reason says what feeds the BN
        out_shape, in_shape = g.shape(r), g.shape(src)
        if out_shape is None or in_shape is None:
            return Reject("reshape between producer and BN: needs example inputs to check the feature axis")
        if len(out_shape) != 2 or len(in_shape) < 2 or in_shape[-1] != out_shape[1]:
            return Reject(f"the reshape {list(in_shape)} → {list(out_shape)} does not keep the producer's last axis as the BN's channels")
        if len(g.data_users(r)) != 1:
            return Reject(f"the reshape output has {len(g.data_users(r))} consumers")
        path, why = ctx.producer(src)
        if why:
            return Reject(why)
        prod = ctx.module(path)
        if not isinstance(prod, nn.Linear):
            return Reject(f"producer `{path}` is {type(prod).__name__}: its channels are not the last axis")
        if prod.out_features != ctx.channels(bn):
            return Reject(f"Linear `{path}` has {prod.out_features} features, BN has {ctx.channels(bn)}")
        return Match([path], [Edit(path, "backward", bn)])


_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
_NOOPS = {"contiguous", "clone", "detach"}


def _passthrough(g: Graph, u, x, rank: int | None, repeat: int):
    """How a node between BN and its consumer maps per-channel affine data, as
    (kind, rank, repeat), a reason (str) when it applies but breaks exactness, or None."""
    mod = g.module_of(u)
    if mod is not None:
        if isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd)):
            return ("dropout", rank, repeat)
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return ("pool", rank, repeat)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
            if any(pad) or mod.ceil_mode:
                return f"{type(mod).__name__} `{u.target}` pads or uses ceil_mode (border averages see zeros)"
            return ("pool", rank, repeat)
        if isinstance(mod, nn.Flatten):
            return _flatten(g, u, x, rank, repeat, mod.start_dim, mod.end_dim)
        return None
    name = g.op_name(u)
    if name is None or not u.all_input_nodes or u.all_input_nodes[0] is not x:
        return None
    if name in _DROPOUTS:
        training = _arg(u, 2, "training", _arg(u, 2, "train", True))
        return ("dropout", rank, repeat) if training is False else f"`{name}` runs in training mode"
    if name in _NOOPS:
        return ("dropout", rank, repeat)
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d"):
        return ("pool", rank, repeat)
    if name == "mean":
        dims = _arg(u, 1, "dim")
        keep = _arg(u, 2, "keepdim", False)
        if dims is None:
            return "`mean` over every axis mixes channels"
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return "`mean` over axes computed at run time"
        if rank is None and any(d < 0 for d in dims):
            return "`mean` over negative axes: needs example inputs to know the rank"
        dims = [d + rank if d < 0 else d for d in dims]
        if any(d < 2 for d in dims):
            return f"`mean` over axes {dims} includes the batch or channel axis"
        return ("pool", None if rank is None else (rank if keep else rank - len(dims)), repeat)
    if name == "flatten":
        return _flatten(g, u, x, rank, repeat, _arg(u, 1, "start_dim", 0), _arg(u, 2, "end_dim", -1))
    if name in ("reshape", "view"):
        ins, outs = g.shape(x), g.shape(u)
        if ins is None or outs is None:
            return f"`{name}` after the BN: needs example inputs to check the channel axis"
        if len(outs) == 2 and outs[0] == ins[0] and outs[1] == math.prod(ins[1:]):
            return ("pool", 2, repeat * math.prod(ins[2:]))
        return f"`{name}` {list(ins)} → {list(outs)} moves the channel axis"
    return None


def _flatten(g: Graph, u, x, rank, repeat, start, end):
    if not isinstance(start, int) or not isinstance(end, int):
        return "flatten with axes computed at run time"
    ins = g.shape(x)
    if ins is None:
        return "flatten after the BN: needs example inputs to know the spatial size"
    end = end + len(ins) if end < 0 else end
    if start != 1 or end != len(ins) - 1:
        return f"flatten({start}, {end}) does not keep the batch axis and channels first"
    return ("pool", 2, repeat * math.prod(ins[2:]))


class Forward:
    """BN → (dropout, identity, average pool / mean, flatten) → unpadded Conv or Linear: scale the
    consumer's input channels and push the shift through its weights ("pool-head" when a pool or
    flatten sits between)."""

    name = "forward"

    def match(self, ctx: Context, bn: str, call: Call):
        g = ctx.g
        kind, _ = bn_kinds.bn_kind(ctx.module(bn))
        if not bn_kinds.remainder_is_identity(kind.remainder(ctx.module(bn))):
            act = getattr(ctx.module(bn), "act", None)
            return Reject(f"{type(ctx.module(bn)).__name__} applies {type(act).__name__ if act is not None else 'more'} after normalising")
        if len(call.outputs) != 1:
            return Reject("BN output is not a single value")
        node = call.outputs[0]
        own = g.owner(node)
        rank = g.rank(node) if g.rank(node) is not None else call.rank_in
        repeat, crossed = 1, []
        while True:
            users = g.data_users(node, own)
            if len(users) != 1:
                where = "BN output" if not crossed else f"the `{crossed[-1][1]}` after the BN"
                return Reject(f"{where} has {len(users)} consumers")
            u = users[0]
            if g.owner(u) is not None:
                break
            step = _passthrough(g, u, node, rank, repeat)
            if step is None:
                return Reject(f"BN output goes to {g.what(u)}, not to a Conv/Linear module")
            if isinstance(step, str):
                return Reject(step)
            kind_, rank, repeat = step
            crossed.append((kind_, g.what(u).strip("`")))
            node, own = u, None
        cpath = g.owner(u)[0]
        cons = ctx.module(cpath)
        pk, why = bn_kinds.producer_kind(cons)
        if pk is None:
            if why:
                return Reject(f"consumer `{cpath}` ({type(cons).__name__}) overrides forward()")
            return Reject(f"BN output goes to {type(cons).__name__} `{cpath}`")
        if bn_kinds.is_transposed(cons):
            return Reject(f"consumer `{cpath}` is a ConvTranspose (border outputs see part of the kernel: the shift would not be exact)")
        if pk.forward:
            return Reject(f"consumer `{cpath}` ({type(cons).__name__}) {pk.forward}")
        if len(g.calls[cpath]) != 1:
            return Reject(f"consumer `{cpath}` is called {len(g.calls[cpath])} times")
        ccall = next(iter(g.calls[cpath].values()))
        if ccall.inputs != [node]:
            return Reject(f"consumer `{cpath}` reads other inputs too")
        if bn_kinds.is_conv(cons):
            if _has_padding(cons):
                return Reject(f"consumer `{cpath}` pads its input (padding={cons.padding}); padded zeros never went through the BN")
            if repeat != 1:
                return Reject(f"consumer `{cpath}` reads a flattened BN output")
        elif isinstance(cons, nn.Linear):
            if rank is None:
                return Reject("BN → Linear needs example inputs to check the BN input is (N, C)")
            if rank != 2:
                return Reject(f"BN input has rank {rank}; the Linear `{cpath}` does not read channels on dim 1")
            if cons.in_features != ctx.channels(bn) * repeat:
                return Reject(f"Linear `{cpath}` reads {cons.in_features} features, the BN gives {ctx.channels(bn)}×{repeat}")
        else:
            return Reject(f"BN output goes to {type(cons).__name__} `{cpath}`")
        tied = ctx.tied(cpath)
        if tied:
            return Reject(f"consumer `{cpath}`: {tied}")
        rule = "pool-head" if any(k == "pool" for k, _ in crossed) else None
        return Match([cpath], [Edit(cpath, "forward", bn, None, repeat)], rule)


def _has_padding(conv: nn.Module) -> bool:
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return False
        # 'same' pads unless every (dilated) kernel extent is 1
        return any((k - 1) * d for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p != 0 for p in pad)


_ADDS = {"add", "iadd", "add_", "sub", "isub", "sub_"}


def _is_sum(g: Graph, n) -> bool:
    """A plain sum of tensors (x + y, x += y, torch.add without alpha) or an eval-time identity."""
    mod = g.module_of(n)
    if mod is not None:
        return isinstance(mod, (nn.Identity, nn.modules.dropout._DropoutNd))
    if g.op_name(n) not in _ADDS or "alpha" in n.kwargs or len(n.args) > 2:
        return False
    return g.owner(n) is None


def _strip_identity(g: Graph, n):
    """The value behind eval-time identity modules (nn.Identity, Dropout)."""
    while isinstance(g.module_of(n), (nn.Identity, nn.modules.dropout._DropoutNd)) and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


class Branches:
    """x → BN summed with conv branches on the same x (RepVGG, MobileOne, RepViT, …): BN(x) is a
    conv with s at the centre tap and bias t, added to one conv branch (stride 1, centred padding,
    in = out channels). Runs after the first pass: the conv's own BN must already fold into it."""

    name = "branches"

    def match(self, ctx: Context, bn: str, call: Call, plan, taken):
        g = ctx.g
        if len(call.inputs) != 1 or len(call.outputs) != 1:
            return None
        x, o = call.inputs[0], call.outputs[0]
        x = _strip_identity(g, x)  # RepGhost: bn(Identity()(x1)) is a branch on x1
        users = g.data_users(o)
        if len(users) != 1 or not _is_sum(g, users[0]) or g.module_of(users[0]) is not None:
            return None
        kind, _ = bn_kinds.bn_kind(ctx.module(bn))
        if not bn_kinds.remainder_is_identity(kind.remainder(ctx.module(bn))):
            return Reject(f"{type(ctx.module(bn)).__name__} applies an activation before the sum")
        root = users[0]
        while True:
            up = g.data_users(root)
            if len(up) == 1 and _is_sum(g, up[0]):
                root = up[0]
                continue
            break
        leaves: list = []  # (node, ±1): the sum is Σ sign·leaf

        def expand(n, sign):
            if n is not root and (not _is_sum(g, n) or len(g.data_users(n)) != 1):
                leaves.append((n, sign))
                return
            if g.op_name(n) in ("sub", "isub", "sub_"):
                args = [a for a in n.args if isinstance(a, type(n))]
                if len(args) != len(n.args):  # a constant operand (x - 1): not a plain branch sum
                    leaves.append((n, sign))
                    return
                expand(n.args[0], sign)
                expand(n.args[1], -sign)
                return
            for a in n.all_input_nodes:
                expand(a, sign)

        expand(root, 1)
        mine = [s for n, s in leaves if n is o]
        if len(mine) != 1:
            return Reject("the BN branch enters the sum more than once")
        sign_bn = mine[0]
        backward = {(e.target, e.bn) for e in plan.edits if e.op == "backward"}
        reasons = []
        for leaf, sign in leaves:
            if leaf is o:
                continue
            own = g.owner(leaf)
            if own is None:
                continue
            if len(g.data_users(leaf, own)) != 1:
                reasons.append(f"branch `{own[0]}`'s output is used outside the sum")
                continue
            path = own[0]
            mod = ctx.module(path)
            if bn_kinds.is_batchnorm(mod):  # conv → BN branch: the BN must have folded into the conv
                k2, _ = bn_kinds.bn_kind(mod)
                lcall = next(iter(g.calls[path].values()))
                if k2 is None or not bn_kinds.remainder_is_identity(k2.remainder(mod)) or len(lcall.inputs) != 1:
                    continue
                src_own = g.owner(lcall.inputs[0])
                if src_own is None or (src_own[0], path) not in backward:
                    continue
                path = src_own[0]
                mod = ctx.module(path)
            why = self._conv_ok(ctx, path, mod, x, bn, taken)
            if why is None:
                return Match([path], [Edit(path, "identity", bn, sign=sign_bn * sign)])
            reasons.append(why)
        return Reject("; ".join(reasons) if reasons else "no conv branch on the same input in the sum")

    @staticmethod
    def _conv_ok(ctx: Context, path: str, mod: nn.Module, x, bn: str, taken) -> str | None:
        g = ctx.g
        pk, why = bn_kinds.producer_kind(mod)
        if pk is None or not bn_kinds.is_conv(mod) or pk.backward or pk.forward:
            return f"branch `{path}` ({type(mod).__name__}) is not a plain Conv"
        calls = g.calls[path]
        cin = next(iter(calls.values())).inputs
        if len(calls) != 1 or len(cin) != 1 or _strip_identity(g, cin[0]) is not x:
            return f"branch `{path}` does not read the BN's input alone"
        c = ctx.channels(bn)
        if mod.in_channels != c or mod.out_channels != c:
            return f"branch `{path}` maps {mod.in_channels}→{mod.out_channels} channels, the BN has {c}"
        if any(s != 1 for s in mod.stride):
            return f"branch `{path}` has stride {mod.stride}"
        if any(k % 2 == 0 for k in mod.kernel_size):
            return f"branch `{path}` kernel {mod.kernel_size} has no centre tap"
        pad = mod.padding
        centred = tuple(d * (k - 1) // 2 for k, d in zip(mod.kernel_size, mod.dilation))
        if not (pad == "same" or tuple(pad) == centred):
            return f"branch `{path}` padding {pad} does not centre the kernel (needs {centred})"
        tied = ctx.tied(path)
        if tied:
            return f"branch `{path}`: {tied}"
        return None


# The order is the preference: a backward fold keeps the consumer's padding question out of it.
RULES = [Backward(), Concat(), Reshape(), Forward()]
# Rules that read the first pass's folds.
LATE_RULES = [Branches()]
