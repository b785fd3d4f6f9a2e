"""Edits to a converted file that its converter cannot be asked for: the open-set bank kept in
float16, and the class scores as the first output (the output classifier runtimes read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def half_constants(model: bytes, part: str, min_bytes: int = 1 << 16) -> bytes:
    """The TFLite model with the large float32 constants of layer ``part`` stored in float16
    and expanded by a DEQUANTIZE op when it loads, as TFLite's own float16 mode stores weights.

    The converter folds the open-set layer's cast of its float16 bank back into a float32
    constant, which doubled the largest part of the file; this puts it back to half."""
    from tensorflow.lite.python import schema_py_generated as fb
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    dequantize = fb.BuiltinOperator.DEQUANTIZE
    code = next((i for i, c in enumerate(obj.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == dequantize), None)
    changed = False
    for graph in obj.subgraphs:
        for index, tensor in enumerate(list(graph.tensors)):
            data = obj.buffers[tensor.buffer].data if tensor.buffer else None
            if (f"/{part}" not in tensor.name.decode(errors="replace")
                    or tensor.type != fb.TensorType.FLOAT32 or data is None
                    or len(data) < min_bytes):
                continue
            if code is None:
                opcode = fb.OperatorCodeT()
                opcode.builtinCode = opcode.deprecatedBuiltinCode = dequantize
                opcode.version = 3  # float16 input
                obj.operatorCodes.append(opcode)
                code = len(obj.operatorCodes) - 1
            half = fb.BufferT()
            half.data = np.frombuffer(bytes(data), np.float32).astype(np.float16).view(np.uint8)
            obj.buffers.append(half)
            stored = fb.TensorT()
            stored.shape, stored.type = tensor.shape, fb.TensorType.FLOAT16
            stored.buffer, stored.name = len(obj.buffers) - 1, tensor.name + b"_float16"
            graph.tensors.append(stored)
            obj.buffers[tensor.buffer].data = None  # the float32 tensor is computed now
            expand = fb.OperatorT()
            expand.opcodeIndex, expand.inputs, expand.outputs = code, [len(graph.tensors) - 1], \
                [index]
            graph.operators.insert(0, expand)  # a constant input: it can run first
            changed = True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj)) if changed else model


def half_onnx(path: Path, part: str, min_bytes: int = 1 << 16) -> None:
    """The ONNX file with the large float32 initializers of layer ``part`` stored in float16
    and cast back by a node (tf2onnx folds the layer's own cast as the TFLite converter does)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    changed = False
    for init in list(model.graph.initializer):
        if f"/{part}" not in init.name or init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        if array.nbytes < min_bytes:
            continue
        half = numpy_helper.from_array(array.astype(np.float16), init.name + "_float16")
        model.graph.initializer.remove(init)
        model.graph.initializer.append(half)
        model.graph.node.insert(0, helper.make_node("Cast", [half.name], [init.name],
                                                    to=TensorProto.FLOAT))
        changed = True
    if changed:
        onnx.save(model, str(path))


def classes_first(model: bytes, name: str = "probabilities") -> bytes:
    """The TFLite model with output ``name`` first: classifier runtimes read the first output.

    The converter orders a signature's outputs by name, which puts ``ood_score`` before
    ``probabilities``; the signature itself maps names to tensors and is unchanged."""
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph, changed = obj.subgraphs[0], False
    for signature in obj.signatureDefs or []:
        first = [o.tensorIndex for o in signature.outputs if o.name.decode() == name]
        if not first or len(graph.outputs) < 2 or graph.outputs[0] == first[0]:
            continue
        graph.outputs = [first[0]] + [i for i in graph.outputs if i != first[0]]
        signature.outputs.sort(key=lambda o: o.name.decode() != name)
        changed = True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj)) if changed else model


def classes_first_onnx(path: Path) -> None:
    """The ONNX file with ``probabilities`` as its first output (classifier runtimes read the
    first; the exporter orders them by name, ``ood_score`` first)."""
    import onnx

    model = onnx.load(str(path))
    outputs = list(model.graph.output)
    ordered = sorted(outputs, key=lambda o: o.name != "probabilities")
    if [o.name for o in ordered] != [o.name for o in outputs]:
        del model.graph.output[:]
        model.graph.output.extend(ordered)
        onnx.save(model, str(path))
