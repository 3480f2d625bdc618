"""edgepeft.exporters: PyTorch adapters and their frozen base to ONNX."""
from edgepeft.errors import training_side

with training_side("edgepeft.exporters"):  # a runtime-only install: one line naming the install that has torch, onnx...
    from edgepeft.exporters.export import export

__all__ = ["export"]
