"""fxopt.verification: numerics (output comparison, tolerances) and ONNX Runtime runs in a child process."""
