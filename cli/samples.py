"""Small real models for the demo and the tests: an fp32 ONNX MLP built with onnx.helper.

Big enough that weights, not graph overhead, dominate the file, as in a real model, and
that its int8 variant is clearly faster than fp32 on a CPU (at 128x256 it was not, at
128x2048 not always under load);
``seed`` and ``hidden`` make different versions differ in bytes. Needs the controller
extra (onnx, numpy).
"""


def mlp_onnx(hidden: int = 4096, inputs: int = 128, classes: int = 10, seed: int = 0, *,
             scratch_bytes: int = 0, batch: int | str = 1) -> bytes:
    """An fp32 MLP: x[batch, inputs] -> MatMul -> Relu -> MatMul -> y[batch, classes]
    (``batch``: a size, or a name for a dynamic one).

    ``scratch_bytes`` makes a model that answers exactly the same but needs that much
    more memory per row of x on every run: each row is expanded to a scratch tensor of
    that size, one row of which is multiplied by zero before it is added back (a real memory
    regression in the file, such as a careless export that materialises a broadcast;
    one that grows with the batch, so a one-row sample shows little of it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((inputs, hidden), dtype=np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, classes), dtype=np.float32), "W2")
    nodes, weights, first = [], [w1, w2], "x"
    if scratch_bytes:
        rows = max(1, scratch_bytes // (4 * inputs))
        weights += [numpy_helper.from_array(np.array([1, rows, inputs], np.int64), "S"),
                    numpy_helper.from_array(np.array([1], np.int64), "A"),
                    numpy_helper.from_array(np.array([rows - 1], np.int64), "L"),
                    numpy_helper.from_array(np.zeros(1, np.float32), "Z")]
        # the last row of the scratch is read back: it is all written, not all read
        nodes += [helper.make_node("Unsqueeze", ["x", "A"], ["u"]),
                  helper.make_node("Expand", ["u", "S"], ["e"]),
                  helper.make_node("Gather", ["e", "L"], ["g"], axis=1),
                  helper.make_node("Squeeze", ["g", "A"], ["s"]),
                  helper.make_node("Mul", ["s", "Z"], ["z"]),
                  helper.make_node("Add", ["x", "z"], ["x2"])]
        first = "x2"
    nodes += [helper.make_node("MatMul", [first, "W1"], ["h"]),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return bytes(model.SerializeToString())
