"""fxopt.backends: lowering of optimised graphs (ONNX export and verification, TensorRT plans)."""
