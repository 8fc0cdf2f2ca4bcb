"""Device-side runtime: numpy + OpenCV + ONNX Runtime or TensorRT. Imported as ``edgead.runtime``.

Never imports torch; keeps Python 3.8 syntax (JetPack 5).
"""
