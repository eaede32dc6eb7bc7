"""fxopt.backends: lowering of optimised graphs (ONNX export and verification, TensorRT plans).

Importing it registers the core's extension points it provides (`fxopt.extensions`): ``lower``
``"onnx"`` and ``deployment`` ``"tensorrt"``.
"""

from fxopt.backends import onnx as _onnx
from fxopt.backends import tensorrt as _tensorrt
from fxopt.extensions import register_extension

register_extension("lower", "onnx", _onnx.lower)
register_extension("deployment", "tensorrt", _tensorrt.deploy)
