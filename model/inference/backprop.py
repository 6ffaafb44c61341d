"""Grad-CAM's gradient on the serving runtime: the bundle's ONNX graph, extended backwards.

:func:`gradcam_graph` takes the forward ONNX graph a bundle ships (``onnx/model.onnx``) and adds
the reverse-mode derivative of the malignancy score's log-odds with respect to the feature maps
Grad-CAM reads (the last cell at ``1/stride`` of the input's side — NASNet's 16 × 16 cell at 128
px, as ``model.inference.gradcam`` picks it in Keras): each forward node between that cell and the
log-odds gets its adjoint, written in plain ONNX operators (a convolution's is the transposed
convolution with the same kernel, a pooling's a transposed depthwise convolution of ones or a
scatter to the max-pooling's own indices, a ReLU's a mask, a concatenation's a split…). The graph
that comes out runs on ONNX Runtime, so a serving process draws heat maps without TensorFlow or
Keras; it is built from the shipped file when a worker first needs it (the ``onnx`` package, a
second or two), so it always has the very weights the forward pass scores with.

Outputs: ``logit`` (n, 1), and for each cell (one per ensemble member) ``cell_k`` (n, C, h, w) and
``cell_grad_k`` (n, C, h, w). An operator this module cannot differentiate is named in a
:class:`~model.errors.ModelError`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from model.errors import ModelError

STRIDE = 8


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Builder:
    """The new nodes and constants of the backward graph, with unique names."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list] = {}
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = value.type.tensor_type.shape.dim
            self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in model.graph.node:  # Constant nodes are constants too
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.nodes, self.initializers, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"gradcam/{hint}_{self._n}"

    def const(self, value, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def shape(self, tensor: str) -> list:
        found = self.shapes.get(tensor)
        if found is None:
            raise ModelError(f"Grad-CAM graph: the shape of {tensor!r} is unknown")
        return found

    def spatial(self, tensor: str) -> list[int]:
        dims = self.shape(tensor)[1:]
        if any(d is None for d in dims):
            raise ModelError(f"Grad-CAM graph: {tensor!r} has no fixed shape beyond its batch ({dims})")
        return dims

    def unbroadcast(self, grad: str, target: str, result: str) -> str:
        """``grad`` (the shape of ``result``) summed down to the shape of ``target``."""
        mine, theirs = self.shape(target), self.shape(result)
        if len(mine) == len(theirs) and all(a == b for a, b in zip(mine[1:], theirs[1:], strict=True)):
            return grad
        lead = len(theirs) - len(mine)  # a tensor with the batch never needs it summed away
        axes = list(range(lead)) + [lead + i for i, d in enumerate(mine) if d == 1 and theirs[lead + i] != 1]
        summed = (
            self.op("ReduceSum", [grad, self.const(np.array(axes, np.int64), "axes")], keepdims=1) if axes else grad
        )
        return self.op("Reshape", [summed, self.op("Shape", [target])])


def _transpose_conv(b: _Builder, grad: str, weight: str, x: str, y: str, attrs: dict) -> str:
    """The adjoint of a (grouped) 2-D convolution with respect to its input."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError("Grad-CAM graph: a convolution with auto_pad (explicit pads only)")
    kernel = list(attrs.get("kernel_shape") or b.constants[weight].shape[2:])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    dilations = list(attrs.get("dilations", [1] * rank))
    x_dims, y_dims = b.spatial(x)[1:], b.spatial(y)[1:]
    output_padding = [
        x_dims[i] - (strides[i] * (y_dims[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + rank])
        for i in range(rank)
    ]  # fmt: skip
    return b.op(
        "ConvTranspose", [grad, weight], kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations,
        group=int(attrs.get("group", 1)), output_padding=output_padding,
    )  # fmt: skip


def _adjoints(b: _Builder, node, grad: str, needs) -> list[tuple[str, str]]:
    """(input name, its gradient) for each input of ``node`` on the path (``needs``); an input
    used twice (``Add(x, x)``) is listed twice."""
    op, ins, out = node.op_type, list(node.input), node.output[0]
    attrs = _attrs(node)
    if op in ("Identity", "Dropout"):
        return [(ins[0], grad)]
    if op in ("Squeeze", "Unsqueeze", "Reshape", "Flatten"):
        return [(ins[0], b.op("Reshape", [grad, b.op("Shape", [ins[0]])]))]
    if op == "Transpose":
        perm = list(attrs["perm"])
        return [(ins[0], b.op("Transpose", [grad], perm=[perm.index(i) for i in range(len(perm))]))]
    if op == "Relu":
        positive = b.op("Cast", [b.op("Greater", [out, b.const(np.float32(0))])], to=1)
        return [(ins[0], b.op("Mul", [grad, positive]))]
    if op == "Sigmoid":  # dy/dx = y (1 - y)
        slope = b.op("Mul", [out, b.op("Sub", [b.const(np.float32(1)), out])])
        return [(ins[0], b.op("Mul", [grad, slope]))]
    if op in ("Add", "Sub"):
        result = []
        for k, name in enumerate(ins):
            if needs(name):
                g = grad if (op == "Add" or k == 0) else b.op("Neg", [grad])
                result.append((name, b.unbroadcast(g, name, out)))
        return result
    if op == "Mul":
        result = []
        for k, name in enumerate(ins):
            if needs(name):
                result.append((name, b.unbroadcast(b.op("Mul", [grad, ins[1 - k]]), name, out)))
        return result
    if op == "Div":
        if needs(ins[1]):
            raise ModelError("Grad-CAM graph: a division by a tensor that depends on the feature maps")
        return [(ins[0], b.unbroadcast(b.op("Div", [grad, ins[1]]), ins[0], out))]
    if op == "Concat":
        axis = int(attrs["axis"])
        rank = len(b.shape(out))
        axis = axis + rank if axis < 0 else axis
        sizes = [b.shape(name)[axis] for name in ins]
        if any(s is None for s in sizes):
            raise ModelError(f"Grad-CAM graph: {node.name}: a concatenation of unknown sizes")
        parts = [b.name("split") for _ in ins]
        b.nodes.append(
            b.onnx.helper.make_node("Split", [grad, b.const(np.array(sizes, np.int64), "sizes")], parts, axis=axis)
        )
        return [(name, part) for name, part in zip(ins, parts, strict=True) if needs(name)]
    if op == "Conv":
        if any(needs(name) for name in ins[1:]):
            raise ModelError(f"Grad-CAM graph: {node.name}: a convolution whose kernel depends on the feature maps")
        return [(ins[0], _transpose_conv(b, grad, ins[1], ins[0], out, attrs))]
    if op == "AveragePool":
        kernel, rank = list(attrs["kernel_shape"]), len(attrs["kernel_shape"])
        strides, pads = list(attrs.get("strides", [1] * rank)), list(attrs.get("pads", [0] * (2 * rank)))
        if attrs.get("ceil_mode", 0) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ModelError(f"Grad-CAM graph: {node.name}: average pooling with ceil_mode or auto_pad")
        channels, *x_dims = b.spatial(ins[0])
        y_dims = b.spatial(out)[1:]
        # how many input values each output averaged (padding excluded unless count_include_pad)
        counts = np.ones(y_dims, np.float32) * float(np.prod(kernel))
        if not attrs.get("count_include_pad", 0):
            for index in np.ndindex(*y_dims):
                covered = 1
                for i, j in enumerate(index):
                    start = j * strides[i] - pads[i]
                    covered *= min(start + kernel[i], x_dims[i]) - max(start, 0)
                counts[index] = covered
        scaled = b.op("Div", [grad, b.const(counts[None, None], "counts")])
        ones = b.const(np.ones((channels, 1, *kernel), np.float32), "ones")
        return [
            (
                ins[0],
                _transpose_conv(b, scaled, ones, ins[0], out, {**attrs, "group": channels, "kernel_shape": kernel}),
            )
        ]
    if op == "MaxPool":
        if len(node.output) < 2:  # the forward pass keeps the positions of its maxima
            node.output.append(b.name("argmax"))
        flat = b.op("Reshape", [grad, b.const(np.array([-1], np.int64), "flat")])
        where = b.op("Reshape", [node.output[1], b.const(np.array([-1], np.int64), "flat")])
        size = b.op("Reshape", [b.op("Size", [ins[0]]), b.const(np.array([1], np.int64), "one")])
        zeros = b.op("ConstantOfShape", [size], value=b.numpy_helper.from_array(np.zeros(1, np.float32)))
        scattered = b.op("ScatterElements", [zeros, where, flat], axis=0, reduction="add")
        return [(ins[0], b.op("Reshape", [scattered, b.op("Shape", [ins[0]])]))]
    if op == "GlobalAveragePool":
        area = float(np.prod(b.spatial(ins[0])[1:]))
        return [(ins[0], b.op("Expand", [b.op("Div", [grad, b.const(np.float32(area))]), b.op("Shape", [ins[0]])]))]
    if op == "ReduceMean":
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1:
            axes = b.constants[ins[1]].tolist()
        dims = b.shape(ins[0])
        area = float(np.prod([dims[a] for a in axes]))
        kept = grad if attrs.get("keepdims", 1) else b.op("Unsqueeze", [grad, b.const(np.array(axes, np.int64))])
        return [(ins[0], b.op("Expand", [b.op("Div", [kept, b.const(np.float32(area))]), b.op("Shape", [ins[0]])]))]
    if op == "Pad":
        mode = attrs.get("mode", b"constant")
        pads = b.constants.get(ins[1]) if len(ins) > 1 else np.asarray(attrs.get("pads"))
        if mode not in (b"constant", "constant") or pads is None or (len(ins) > 3 and ins[3]):
            raise ModelError(f"Grad-CAM graph: {node.name}: only constant padding with fixed pads")
        pads = np.asarray(pads, np.int64)
        rank = len(pads) // 2
        if pads[0] or pads[rank]:
            raise ModelError(f"Grad-CAM graph: {node.name}: padding along the batch")
        dims = b.spatial(ins[0])
        starts = pads[1:rank]
        ends = starts + np.array(dims, np.int64)
        axes = np.arange(1, rank, dtype=np.int64)
        return [(ins[0], b.op("Slice", [grad, b.const(starts), b.const(ends), b.const(axes)]))]
    if op == "Slice":
        x_dims = b.shape(ins[0])
        starts, ends = (b.constants.get(n) for n in ins[1:3])
        axes = b.constants.get(ins[3]) if len(ins) > 3 and ins[3] else np.arange(len(starts))
        steps = b.constants.get(ins[4]) if len(ins) > 4 and ins[4] else np.ones(len(starts), np.int64)
        if starts is None or ends is None or axes is None or steps is None or np.any(np.asarray(steps) != 1):
            raise ModelError(f"Grad-CAM graph: {node.name}: only slices of fixed bounds and step 1")
        rank = len(x_dims)
        pads = np.zeros(2 * rank, np.int64)
        for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
            axis = axis + rank if axis < 0 else axis
            size = x_dims[axis]
            if size is None:
                if start == 0 and end >= 2**31 - 1:
                    continue
                raise ModelError(f"Grad-CAM graph: {node.name}: a slice along an axis of unknown size")
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            pads[axis], pads[axis + rank] = start, size - end
        return [(ins[0], b.op("Pad", [grad, b.const(pads)], mode="constant"))]
    if op == "MatMul":
        if needs(ins[1]) or ins[1] not in b.constants or b.constants[ins[1]].ndim != 2:
            raise ModelError(f"Grad-CAM graph: {node.name}: only a product with a fixed matrix")
        return [(ins[0], b.op("MatMul", [grad, b.const(b.constants[ins[1]].T.copy(), "weight_t")]))]
    if op == "Gemm":
        if needs(ins[1]) or ins[1] not in b.constants or attrs.get("transA", 0):
            raise ModelError(f"Grad-CAM graph: {node.name}: only a product with a fixed matrix")
        weight = b.constants[ins[1]]
        weight = weight if attrs.get("transB", 0) else weight.T
        alpha = np.float32(attrs.get("alpha", 1.0))
        return [(ins[0], b.op("MatMul", [grad, b.const((alpha * weight).astype(np.float32).copy(), "weight_t")]))]
    raise ModelError(
        f"Grad-CAM graph: no gradient for the operator {op} ({node.name or out}) between the feature maps and the score"
        f" (inputs {[name for name in ins if needs(name)]})"
    )


def _ancestors(producer: dict, names) -> set[str]:
    """Every tensor the given tensors are computed from (themselves included)."""
    seen, stack = set(names), list(names)
    while stack:
        node = producer.get(stack.pop())
        for name in node.input if node is not None else ():
            if name and name not in seen:
                seen.add(name)
                stack.append(name)
    return seen


def _cells(b: _Builder, model, stride: int) -> list[tuple[str, bool]]:
    """The feature maps Grad-CAM reads, as (tensor, channels last?): the last concatenations (a
    NASNet cell's output) at ``1/stride`` of the input's side, one per ensemble member; a backbone
    without one (the tests' tiny network) uses what its global average pooling reads — the same
    rule as ``model.inference.gradcam.cell_layer`` in Keras."""
    image = next(i for i in model.graph.input if i.name == "image")
    height = image.type.tensor_type.shape.dim[1].dim_value
    candidates = [
        n.output[0] for n in model.graph.node
        if n.op_type == "Concat" and len(b.shape(n.output[0])) == 4 and b.shape(n.output[0])[2] == height // stride
    ]  # fmt: skip
    if not candidates:
        pooled = [
            (n.input[0], n.op_type == "ReduceMean")
            for n in model.graph.node
            if n.op_type == "GlobalAveragePool"
            or (n.op_type == "ReduceMean" and len(b.shape(n.input[0])) == 4 and _reduce_axes(b, n) == [1, 2])
        ]
        if not pooled:
            raise ModelError(f"Grad-CAM graph: no feature maps at 1/{stride} of the input's side, no global pooling")
        return pooled
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    later = set()
    for cell in candidates:  # drop a candidate that feeds another one (an earlier cell)
        seen, stack = set(), [cell]
        while stack:
            for node in consumers[stack.pop()]:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        stack.append(out)
        if any(other in seen for other in candidates if other != cell):
            later.add(cell)
    return [(c, False) for c in candidates if c not in later]


def _reduce_axes(b: _Builder, node) -> list[int] | None:
    axes = _attrs(node).get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in b.constants:
        axes = b.constants[node.input[1]].tolist()
    return None if axes is None else sorted(a % 4 for a in axes)


def gradcam_graph(model, stride: int = STRIDE, cells: list[str] | None = None):
    """The forward ONNX ``model`` (a ``ModelProto``) with Grad-CAM's outputs added: ``logit``,
    ``cell_k`` and ``cell_grad_k`` (the log-odds' gradient) for each member's cell, channels first
    (n, C, h, w). ``cells``: other tensors to differentiate for (channels first), instead."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never change the caller's
    # the adjoints are written in opset 17 (ScatterElements' reduction needs 16): an export of
    # opset 13 to 16 runs unchanged there for the operators differentiated here
    default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default.version < 13:
        raise ModelError(f"Grad-CAM graph: an ONNX opset of 13 or newer is needed, not {default and default.version}")
    default.version = max(default.version, 17)
    b = _Builder(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    head = producer.get("probability")
    if head is None:
        raise ModelError("Grad-CAM graph: the model has no 'probability' output")
    found = [(c, False) for c in cells] if cells else _cells(b, model, stride)
    cells = [c for c, _ in found]
    # the log-odds: the input of each member's sigmoid that feeds the probability (one for a
    # single network); each member's map follows its own log-odds, as in Keras
    feeding = _ancestors(producer, ["probability"])
    seeds = [n.input[0] for n in model.graph.node if n.op_type == "Sigmoid" and n.output[0] in feeding]
    if not seeds:
        raise ModelError("Grad-CAM graph: the probability comes from no sigmoid (no log-odds to differentiate)")
    if head.op_type == "Sigmoid":
        logit = seeds[0]
    else:  # an ensemble: the log-odds of its average probability, for the ``logit`` output
        p = b.op("Clip", ["probability", b.const(np.float32(1e-7)), b.const(np.float32(1 - 1e-7))])
        logit = b.op("Log", [b.op("Div", [p, b.op("Sub", [b.const(np.float32(1)), p])])])
    # the nodes between the cells and the score: downstream of a cell, upstream of the score
    downstream = set(cells)
    order = list(model.graph.node)
    for node in order:
        if any(name in downstream for name in node.input):
            downstream.update(node.output)
    on_path = downstream & _ancestors(producer, seeds)

    grads: dict[str, list[str]] = defaultdict(list)
    for z in seeds:
        grads[z].append(b.op("Expand", [b.const(np.float32(1.0)), b.op("Shape", [z])]))
    for node in reversed(order):
        outs = [out for out in node.output if out in on_path and grads.get(out)]
        if not outs or not any(name in on_path for name in node.input):
            continue
        if node.op_type != "MaxPool" and len(node.output) > 1:
            raise ModelError(f"Grad-CAM graph: {node.name}: an operator with several outputs ({node.op_type})")
        total = grads[outs[0]]
        grad = total[0] if len(total) == 1 else b.op("Sum", total)
        for name, g in _adjoints(b, node, grad, lambda n: n in on_path):
            grads[name].append(g)

    def typed(name: str, dims: list):
        return onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, [d if d is not None else "n" for d in dims]
        )

    outputs = [typed("logit", b.shapes.get(logit) or b.shape("probability"))]
    if logit != "logit":  # (a graph may call its own log-odds so already)
        b.nodes.append(onnx.helper.make_node("Identity", [logit], ["logit"], name="gradcam/logit"))
    for k, (cell, last) in enumerate(found):
        total = grads.get(cell)
        if not total:
            raise ModelError(f"Grad-CAM graph: the score does not depend on the feature maps {cell!r}")
        grad = total[0] if len(total) == 1 else b.op("Sum", total)
        # channels last (a backbone pooled by ReduceMean over axes 1, 2) turned to channels first
        kind, extra = ("Transpose", {"perm": [0, 3, 1, 2]}) if last else ("Identity", {})
        dims = b.shape(cell)
        dims = [dims[0], dims[3], dims[1], dims[2]] if last else dims
        for name, source in ((f"cell_{k}", cell), (f"cell_grad_{k}", grad)):
            b.nodes.append(onnx.helper.make_node(kind, [source], [name], name=f"gradcam/{name}", **extra))
            outputs.append(typed(name, dims))

    # keep only what the new outputs need (the differential's head, the gate's features… go)
    nodes = order + b.nodes
    needed = _ancestors({out: node for node in nodes for out in node.output}, [o.name for o in outputs])
    keep_nodes = [n for n in nodes if any(out in needed for out in n.output)]
    graph = model.graph
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(b.initializers)
    used = {i for n in keep_nodes for i in n.input}
    kept_init = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model
