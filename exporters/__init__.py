"""Bundle -> ONNX (and TensorRT engine) exporters. Imported as ``edgead.exporters``."""
