"""edgepeft.exporters: PyTorch adapters and their frozen base to ONNX."""
from edgepeft.exporters.export import export

__all__ = ["export"]
