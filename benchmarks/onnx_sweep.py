"""ONNX-in folding on real files: torchvision BN classification models (and timm models named on the
command line), exported with torch's legacy exporter with and without constant folding, folded by
bnfold, by onnxoptimizer's fuse_bn_into_conv and by onnxruntime (ORT_ENABLE_BASIC); norm-wise
relative error (batch of 2) against the float64 PyTorch model. Checks that every BN whose input comes from a Conv/ConvTranspose/
Gemm with one consumer is folded. Run: OMP_NUM_THREADS=1 python benchmarks/onnx_sweep.py [timm:name ...]
"""

from __future__ import annotations

import io
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, "tests")
from conftest import randomize_bn  # noqa: E402

from bnfold.onnx_pass.io import bn_count  # noqa: E402
from bnfold.onnx_pass.fold import fold_onnx_proto  # noqa: E402


def tv_models() -> list[str]:
    import torchvision as tv

    out = []
    for name in tv.models.list_models(module=tv.models):
        kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        try:
            with torch.device("meta"):
                m = tv.models.get_model(name, weights=None, **kw)
        except NotImplementedError:  # regnet computes its widths with tensors: all of them have BN
            out.append(name)
            continue
        if any(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules()):
            out.append(name)
    return out


def build(name: str):
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False)
    import torchvision as tv

    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return tv.models.get_model(name, weights=None, **kw)


def num_params(name: str) -> int:
    """From torchvision's weight metadata, without building the model (0 when unknown)."""
    if name.startswith("timm:"):
        return 0
    import torchvision as tv

    try:
        return int(tv.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:
        return 0


def run(model, x, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)


def relerr(a, ref) -> float:
    """Norm-wise relative error over the batch (max-abs of one sample is float32 noise)."""
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def expected(m) -> set[str]:
    """BN nodes whose input is produced by Conv/ConvTranspose/Gemm with one consumer (graph only)."""
    prod = {o: n for n in m.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outs = {o.name for o in m.graph.output}
    return {n.name or n.output[0] for n in m.graph.node if n.op_type == "BatchNormalization"
            and n.input[0] in prod and prod[n.input[0]].op_type in ("Conv", "ConvTranspose", "Gemm")
            and uses.get(n.input[0]) == 1 and n.input[0] not in outs}


def main(names: list[str]) -> int:
    import onnxoptimizer

    bad = 0
    print("| model | export | BN | folded | missed | left (first reason) | bnfold err | onnxoptimizer err | ORT err | unfolded err | fold s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        if num_params(name) * 4 > 1_800_000_000:
            print(f"| {name} | skipped: over the 2 GB protobuf limit of an in-memory legacy export |")
            continue
        torch.manual_seed(0)
        try:
            net = randomize_bn(build(name)).eval()
        except Exception as err:
            print(f"| {name} | build failed: {type(err).__name__} |")
            continue
        if sum(p.numel() for p in net.parameters()) * 4 > 1_800_000_000:
            print(f"| {name} | skipped: over the 2 GB protobuf limit of an in-memory legacy export |")
            continue
        size = {"inception_v3": 80, "maxvit_t": 224}.get(name, 224 if name.startswith("vgg") else 64)  # vgg: adaptive pool to 7x7
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = net.double()(x.double()).numpy()
        net.float()
        for cf in (False, True):
            f = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(net, (x,), f, dynamo=False, do_constant_folding=cf, opset_version=17,
                                      training=torch.onnx.TrainingMode.EVAL, dynamic_axes={"input": {0: "n"}}, input_names=["input"])
                except Exception as err:
                    print(f"| {name} | legacy export failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''} |", flush=True)
                    continue
            m = onnx.load_from_string(f.getvalue())
            n0, exp = bn_count(m), expected(m)
            ours = onnx.ModelProto()
            ours.CopyFrom(m)
            t = time.perf_counter()
            plan = fold_onnx_proto(ours)
            dt = time.perf_counter() - t
            folded = {f.bn for f in plan.folded}
            missed = exp - folded
            e_ours = relerr(run(ours, x.numpy()), ref)
            try:
                e_opt = relerr(run(onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]), x.numpy()), ref)
            except Exception as err:  # seen: densenet161 → "Duplicate definition of name" in onnxruntime
                print(f"<!-- {name}: onnxoptimizer's output does not load: {str(err)[:100]} -->")
                e_opt = float("nan")
            e_ort = relerr(run(m, x.numpy(), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), ref)
            e_raw = relerr(run(m, x.numpy()), ref)
            bad += bool(missed) or e_ours > e_opt * 1.25 or bn_count(ours) != len(plan.unfolded)
            first = plan.unfolded[0].reason[:90] if plan.unfolded else ""
            print(f"| {name} | legacy cf={'on' if cf else 'off'} | {n0} | {len(plan.folded)} | {len(missed)} | {len(plan.unfolded)} {first} "
                  f"| {e_ours:.2e} | {e_opt:.2e} | {e_ort:.2e} | {e_raw:.2e} | {dt:.2f} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    names = args + sorted(tv_models(), key=num_params) if not args or args[0].startswith("timm:") else args
    sys.exit(main(names))
