"""Lowering: graphs after their passes -> what a runtime executes.

- :mod:`.segments`: the SpecEE decode graphs cut after every predictor layer (exit mode
  "segments"); the compiler runs each cut graph's pipeline;
- :mod:`.exit_graph`: the segments nested into one decode graph with ``If`` exits (exit
  mode "graph");
- :mod:`.tensorrt` (with :mod:`.trt_check`, :mod:`.trt_ops`): the check against TensorRT's
  ONNX parser, engine profiles and engines (``.plan``) built from saved graphs.

Lowering imports neither calibration nor export: graphs in, graphs or engines out.
"""
