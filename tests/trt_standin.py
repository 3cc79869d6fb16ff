"""A stand-in for the `tensorrt` module that records what build_engine asks of it, with TensorRT
10's documented names (Builder, OnnxParser, BuilderConfig.set_flag / clear_flag /
set_memory_pool_limit / add_optimization_profile, IOptimizationProfile.set_shape /
set_shape_input, ITensor.is_shape_tensor, build_serialized_network -> IHostMemory or None).
TensorRT is not installable here; tests install `RecordingTensorRT(...).module` as sys.modules
["tensorrt"]."""

from __future__ import annotations

import types


class RecordingTensorRT:
    """A stand-in for the `tensorrt` module: records what build_engine asks of it."""

    def __init__(self, version="10.15.1", explicit_batch=None, fp16_flag=True, serialized=b"ENGINE-0123456789",
                 refuse_shape_of=None, keep_is_shape=True, profile_index=0):
        import onnx

        rec = self.rec = {"shapes": {}, "values": {}, "flags": [], "pool": [], "network_flags": [], "parse_path": [],
                          "built": 0}

        class Tensor:
            def __init__(self, name):
                self.name, self.is_shape_tensor = name, name == "num_logits_to_keep" and keep_is_shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse(self, data, path=None):
                rec["parse_path"].append(path)
                m = onnx.load_from_string(data)
                inits = {t.name for t in m.graph.initializer}
                self.network.inputs = [Tensor(v.name) for v in m.graph.input if v.name not in inits]
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                if name == refuse_shape_of:
                    raise RuntimeError("bad shape")  # what the pybind11 bindings raise
                rec["shapes"][name] = (tuple(lo), tuple(opt), tuple(hi))

            def set_shape_input(self, name, lo, opt, hi):
                rec["values"][name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def set_flag(self, f):
                rec["flags"].append(("set", f))

            def clear_flag(self, f):
                rec["flags"].append(("clear", f))

            def set_memory_pool_limit(self, pool, size):
                rec["pool"].append((pool, size))

            def add_optimization_profile(self, p):
                return profile_index

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                rec["network_flags"].append(flags)
                return Network()

            def create_optimization_profile(self):
                return Profile()

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                rec["built"] += 1
                return None if serialized is None else memoryview(serialized)

        creation = types.SimpleNamespace(**({} if explicit_batch is None else {"EXPLICIT_BATCH": explicit_batch}))
        flags = types.SimpleNamespace(TF32="TF32", **({"FP16": "FP16"} if fp16_flag else {}))
        self.module = types.SimpleNamespace(
            __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, sev: None}),
            Builder=Builder, OnnxParser=Parser, NetworkDefinitionCreationFlag=creation, BuilderFlag=flags,
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
