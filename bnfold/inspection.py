"""``bnfold inspect``: every BatchNorm's fate in a model spec or an .onnx file, without writing anything."""

from __future__ import annotations

from bnfold.edges.data import model_dtype_device
from bnfold.edges.load import load_model, parse_model_spec
from bnfold.errors import BnfoldError
from bnfold.onnx_pass.fold import fold_onnx_proto
from bnfold.onnx_pass.io import load_onnx
from bnfold.options import INSPECT, ConvertOptions, OptionError, reword
from bnfold.pipeline import check_example, random_inputs
from bnfold.plan import FoldPlan
from bnfold.torch_pass.fold import inspect


def inspect_spec(model: str, *, options: ConvertOptions | None = None, **kw) -> FoldPlan:
    """The fold plan of ``model``: a spec (``file.py:fn``, ``pkg.mod:fn``; built with ``weights=`` and
    traced with random inputs of ``input_shape=`` when given) or an .onnx file (its BatchNormalization
    nodes, folded in memory only). Keywords are the ``inspect`` options of ``bnfold.options.OPTIONS``
    (or pass one ``ConvertOptions``). For an nn.Module, ``bnfold.inspect(model, example_inputs)``.
    """
    opts = ConvertOptions.resolve(options, kw, INSPECT)
    try:
        spec = parse_model_spec(model)
        if spec.kind == "onnx":
            for key in ("weights", "trust_pickle", "input_shape"):
                if key in opts.given:
                    raise OptionError(opts.via, key, "has no meaning for an ONNX model", "drop it")
            repairs: list[str] = []  # what convert repairs (and says) before folding, inspect repairs too
            plan = fold_onnx_proto(load_onnx(spec.target, repairs))
            plan.repairs[:0] = repairs
            return plan
        m = load_model(spec, opts.weights, trust_pickle=opts.trust_pickle)
        example = random_inputs(opts.input_shape, model_dtype_device(m)[0]) if opts.input_shape else None
        if example is not None:  # a shape the model rejects is bad input (exit 2), as in convert
            check_example(m, example, opts)
        return inspect(m, example)
    except BnfoldError as err:  # options named as the caller spells them (--weights, weights=)
        raise reword(err, opts.via)
