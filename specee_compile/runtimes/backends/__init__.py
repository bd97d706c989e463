"""Backends: how a bundle's graphs run (sessions or engines, buffers, binding).

- :mod:`.ort`: ONNX Runtime (``OrtStep``, ``OrtSpecEE``), :mod:`.ort_tree` its tree graphs;
- :mod:`.tensorrt`: TensorRT engines with CUDA buffers (``TrtStep``, ``TrtSpecEE``).
"""
