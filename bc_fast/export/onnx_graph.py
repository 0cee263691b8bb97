"""A FusedTransform as an ONNX graph: on its own (:func:`to_onnx`) or grafted onto an embedding model's
output (:func:`append_onnx`), so ONNX Runtime serves the old version directly.

Per layer: ``MatMul`` by the transposed weight and ``Add`` of the bias; ReLU or exact GELU (its erf
form, ``0.5 x (1 + erf(x / sqrt 2))``, valid from opset 9) on the leading ``activation_width``
outputs (``Slice``/``Concat`` when partial; Slice's attribute form before opset 10, and axes counted
from the front before opset 11, which brings negative axes); then, if the operator normalises,
``y / max(||y||, 1e-12)`` (``ReduceL2``, ``Max``, ``Div``), as bc_fast computes it. Float32 throughout.
Needs the ``onnx`` package (the ``[onnx]`` extra); files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util.fileio import atomic_write_bytes
from ..engine.operator import FusedTransform

DEFAULT_OPSET = 17


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx package ({e}); pip install 'bc_fast[onnx]'") from None
    return onnx


class _Graph:
    """Nodes and initializers of the layer program, named under one prefix, for an input of rank ``rank``
    (None: unknown)."""

    def __init__(self, onnx: Any, prefix: str, opset: int, rank: int | None = 2) -> None:
        self.onnx, self.prefix, self.opset = onnx, prefix, opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        # The feature axis. Slice, Concat and ReduceL2 take negative axes from opset 11 on; before, count from
        # the front (an unknown rank keeps -1, which ONNX Runtime accepts at every opset).
        self.axis = -1 if opset >= 11 or rank is None else rank - 1

    def name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}{what}_{self._n}"

    def const(self, what: str, value: np.ndarray) -> str:
        n = self.name(what)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def slice(self, x: str, start: int, end: int) -> str:
        """``x[..., start:end]`` on the feature axis: Slice-1's attributes before opset 10, else inputs."""
        if self.opset < 10:
            return self.node("Slice", [x], starts=[start], ends=[end], axes=[self.axis])
        ints = [self.const(what, np.array([v], dtype=np.int64)) for what, v in
                (("start", start), ("end", end), ("axis", self.axis))]
        return self.node("Slice", [x, *ints])

    def activation(self, x: str, act: str) -> str:
        if act == "relu":
            return self.node("Relu", [x])
        half, one = self.const("half", np.float32(0.5)), self.const("one", np.float32(1.0))
        inv_sqrt2 = self.const("inv_sqrt2", np.float32(1.0 / np.sqrt(2.0)))
        erf = self.node("Erf", [self.node("Mul", [x, inv_sqrt2])])
        return self.node("Mul", [self.node("Mul", [x, half]), self.node("Add", [erf, one])])

    def program(self, x: str, op: FusedTransform) -> str:
        """Appends ``op``'s layers applied to tensor ``x`` (..., d_in); returns the output tensor's name."""
        y = x
        for i, layer in enumerate(op.layers):
            w = np.asarray(layer.weight, dtype=np.float32)
            y = self.node("MatMul", [y, self.const(f"w{i}", w.T.copy())])
            if layer.bias is not None:
                y = self.node("Add", [y, self.const(f"b{i}", np.asarray(layer.bias, dtype=np.float32))])
            width = w.shape[0] if layer.activation_width is None else int(layer.activation_width)
            if layer.activation == "none" or width == 0:
                continue
            if width == w.shape[0]:
                y = self.activation(y, layer.activation)
                continue
            head = self.activation(self.slice(y, 0, width), layer.activation)
            y = self.node("Concat", [head, self.slice(y, width, w.shape[0])], axis=self.axis)
        if op.normalize:
            if self.opset >= 18:
                norm = self.node("ReduceL2", [y, self.const("axis", np.array([self.axis], np.int64))], keepdims=1)
            else:
                norm = self.node("ReduceL2", [y], axes=[self.axis], keepdims=1)
            y = self.node("Div", [y, self.node("Max", [norm, self.const("eps", np.float32(1e-12))])])
        return y


def _check_op(op: Any, fn: str) -> None:
    if not isinstance(op, FusedTransform):
        raise TypeError(f"{fn} takes a FusedTransform, got {type(op).__name__}")


def _names(graph: Any) -> set[str]:
    """Every node, tensor and initializer name in ``graph`` (its top level)."""
    values = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    return ({n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)}
            | {v.name for v in values} | {i.values.name for i in graph.sparse_initializer})


def _prefix(taken: set[str], new_output: str) -> str:
    """``bc_fast/<new_output>/``, numbered if a name in ``taken`` starts with it, so each graft's names are new."""
    prefix, k = f"bc_fast/{new_output}/", 1
    while any(t.startswith(prefix) for t in taken):
        k += 1
        prefix = f"bc_fast/{new_output}_{k}/"
    return prefix


def _save(onnx: Any, model: Any, path: str | Path) -> Path:
    onnx.checker.check_model(model)
    return atomic_write_bytes(path, model.SerializeToString())


def to_onnx(op: FusedTransform, path: str | Path, *, opset: int = DEFAULT_OPSET, input_name: str = "embedding",
            output_name: str = "embedding_out") -> Path:
    """Writes ``op`` as an ONNX model: float32 ``input_name`` (batch, d_in) -> ``output_name`` (batch, d_out)."""
    _check_op(op, "to_onnx")
    if not 9 <= int(opset) <= 22:
        raise ValueError(f"opset must be in [9, 22], got {opset}")
    onnx = _onnx()
    g = _Graph(onnx, "bc_fast/", int(opset))
    y = g.program(input_name, op)
    g.nodes.append(onnx.helper.make_node("Identity", [y], [output_name], name="bc_fast/output"))
    graph = onnx.helper.make_graph(
        g.nodes, "bc_fast_fused_transform",
        [onnx.helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["batch", op.d_in])],
        [onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["batch", op.d_out])], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", int(opset))],
                                   producer_name="bc_fast")
    return _save(onnx, model, path)


def append_onnx(model_path: str | Path, op: FusedTransform, out_path: str | Path, *, output: str | None = None,
                new_output: str | None = None) -> Path:
    """Grafts ``op`` onto an ONNX embedding model: a new graph output ``new_output`` (default
    ``<output>_bc_fast``) = ``op`` applied to the model's float32 output ``output`` (default: its one
    float32 2-D output that is ``op.d_in`` wide, or whose width the file leaves symbolic). The model's
    own outputs stay as they were. Call it again on the result to graft more operators (each ``new_output``
    names its own nodes). ``output`` must be float32, like the graph: a ``ValueError`` otherwise (add a
    ``Cast`` to float32 to the model and name its output)."""
    _check_op(op, "append_onnx")
    onnx = _onnx()
    model = onnx.load(str(model_path))
    outs = model.graph.output

    def width(o: Any) -> Any:
        """The last dimension if the output is 2-D and it is known, else None."""
        dims = o.type.tensor_type.shape.dim
        return dims[-1].dim_value if len(dims) == 2 and dims[-1].HasField("dim_value") else None

    # Shapes as ONNX shape inference sees them (outputs often leave them symbolic in the file).
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        seen = {v.name: v for v in [*inferred.value_info, *inferred.output]}
    except Exception:  # noqa: BLE001 (inference is a help: without it, the declared shapes decide)
        seen = {}

    def out_width(o: Any) -> Any:
        return width(o) if width(o) is not None or o.name not in seen else width(seen[o.name])

    def out_rank(o: Any) -> int | None:
        """The number of dimensions, declared or inferred; None if neither says."""
        for t in (o.type.tensor_type, seen[o.name].type.tensor_type if o.name in seen else None):
            if t is not None and t.HasField("shape"):
                return len(t.shape.dim)
        return None

    if output is None:  # the one float32 2-D output that is d_in wide (or of a width nothing tells)
        found = [o.name for o in outs if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                 and len(o.type.tensor_type.shape.dim) == 2 and out_width(o) in (None, op.d_in)]
        if len(found) != 1:
            raise ValueError(f"{model_path}: expected one float32 (batch, {op.d_in}) output to graft onto, found "
                             f"{found or 'none'} among {[o.name for o in outs]}; name it with output=")
        output = found[0]
    match = [o for o in outs if o.name == output]
    if not match:
        raise ValueError(f"{model_path} has no output {output!r}; its outputs: {[o.name for o in outs]}")
    elem = match[0].type.tensor_type.elem_type or (seen[output].type.tensor_type.elem_type if output in seen else 0)
    if elem != onnx.TensorProto.FLOAT:
        raise ValueError(f"{model_path}: output {output!r} is {onnx.TensorProto.DataType.Name(elem)}, expected FLOAT "
                         "(float32), the grafted operator's dtype; add a Cast to float32 to the model and name "
                         "its output with output=")
    if out_width(match[0]) not in (None, op.d_in):
        raise ValueError(f"{model_path}: output {output!r} is {out_width(match[0])} wide but the operator takes "
                         f"{op.d_in}")
    new_output = new_output or f"{output}_bc_fast"
    taken = _names(model.graph)
    if new_output in taken:
        raise ValueError(f"{model_path} already has a tensor or output named {new_output!r}; pass another new_output=")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    g = _Graph(onnx, _prefix(taken, new_output), int(opset), out_rank(match[0]))
    y = g.program(output, op)
    g.nodes.append(onnx.helper.make_node("Identity", [y], [new_output], name=f"{g.prefix}output"))
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.inits)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(new_output, onnx.TensorProto.FLOAT, ["batch", op.d_out]))
    return _save(onnx, model, out_path)
