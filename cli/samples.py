"""Small real models for the demo and the tests: an fp32 ONNX MLP built with onnx.helper.

Big enough that weights, not graph overhead, dominate the file, as in a real model, and
that its int8 variant is clearly faster than fp32 on a CPU (at 128x256 it was not, at
128x2048 not always under load);
``seed`` and ``hidden`` make different versions differ in bytes. Needs the controller
extra (onnx, numpy).
"""


def mlp_onnx(hidden: int = 4096, inputs: int = 128, classes: int = 10, seed: int = 0) -> bytes:
    """An fp32 MLP: x[1, inputs] -> MatMul -> Relu -> MatMul -> y[1, classes]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((inputs, hidden), dtype=np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, classes), dtype=np.float32), "W2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())
