"""TensorRT's engine API as the runtimes use it, emulated with ONNX Runtime on the CPU.

``FakeTrtEngine(onnx_file)`` stands for the engine built from that graph: its execution
context takes tensor addresses (``data_ptr()`` of CPU torch tensors) and input shapes like
TensorRT's, and ``execute_async_v3`` reads the inputs from those addresses, runs the graph
and writes the outputs to theirs. As TensorRT it refuses a run with an unbound tensor or
an unset dynamic shape, and an output bound to an input's buffer (TensorRT does not alias
them). It checks how a runtime drives engines, not TensorRT itself.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import onnxruntime as ort

DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class FakeTrtEngine:
    def __init__(self, onnx_file: Path):
        self.file = Path(onnx_file)
        self.session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.names = [*self.inputs, *self.outputs]
        self.num_io_tensors = len(self.names)
        self.runs = 0

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_shape(self, name: str) -> tuple:
        meta = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in meta.shape)

    def create_execution_context(self) -> "FakeContext":
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeTrtEngine):
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}

    def set_input_shape(self, name: str, shape) -> bool:
        declared = self.engine.get_tensor_shape(name)  # KeyError for an unknown tensor, as a test failure
        shape = tuple(int(d) for d in shape)
        if name not in self.engine.inputs or len(shape) != len(declared) or any(
                d != -1 and d != s for d, s in zip(declared, shape)):
            raise AssertionError(f"{self.engine.file.name}: shape {shape} for {name} (declared {declared})")
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in self.engine.inputs and name not in self.engine.outputs:
            raise AssertionError(f"{self.engine.file.name} has no tensor {name}")
        self.addresses[name] = int(address)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        missing = [n for n in self.engine.names if n not in self.addresses]
        assert not missing, f"{self.engine.file.name}: unbound tensors {missing}"
        aliased = {self.addresses[n] for n in self.engine.outputs} & {self.addresses[n] for n in self.engine.inputs}
        assert not aliased, f"{self.engine.file.name}: an output shares an input's buffer"
        feeds = {}
        for name, meta in self.engine.inputs.items():
            shape = self.engine.get_tensor_shape(name)
            if -1 in shape:
                assert name in self.shapes, f"{self.engine.file.name}: no shape set for {name}"
                shape = self.shapes[name]
            feeds[name] = _read(self.addresses[name], shape, DTYPES[meta.type])
        for (name, meta), value in zip(self.engine.outputs.items(), self.engine.session.run(None, feeds)):
            value = np.ascontiguousarray(value, DTYPES[meta.type])
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        self.engine.runs += 1
        return True


def _read(address: int, shape: tuple, dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
