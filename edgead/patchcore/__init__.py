"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection").

- ``embedding``: locally aware patch features of the two middle backbone stages, projected to ``D``;
- ``coreset``: greedy k-center coreset selection on a random projection;
- ``model``: the torch scoring model (nearest memory-bank entry, chunked; the paper's score reweighting);
- ``fit``: streaming the training images into the memory bank, thresholds out of sample, the bundle.
The method registers itself in ``edgead.methods.patchcore``; its ONNX head is ``edgead.exporters.patchcore_head``.
"""
