#!/usr/bin/env python3
"""Writes a safetensors file as a PyTorch zip-format state dict (`torch.save` layout) without
needing torch: test data for the `.pth` converter.

    scripts/safetensors_to_pth.py IN.safetensors OUT.pth [--strip PREFIX]

Only float32 tensors are written; keys starting with PREFIX lose it (e.g. `weights.`).
"""
import argparse
import collections
import io
import pickle
import sys
import types
import zipfile

from safetensors.numpy import load_file

# Stand-ins for the globals torch.save references, so pickle records them by name.
torch_mod = types.ModuleType("torch")
utils_mod = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch_mod.FloatStorage = FloatStorage
utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch_mod
sys.modules["torch._utils"] = utils_mod


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (
            _rebuild_tensor_v2,
            (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()),
        )


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--strip", default="")
    a = ap.parse_args()
    arrays = load_file(a.input)
    state = collections.OrderedDict()
    blobs = {}
    for i, (k, v) in enumerate(sorted(arrays.items())):
        if not k.startswith(a.strip):
            continue
        v = v.astype("<f4")
        state[k[len(a.strip):]] = Tensor(Storage(str(i), v.size), list(v.shape))
        blobs[str(i)] = v.tobytes()
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    name = "archive"
    with zipfile.ZipFile(a.output, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", buf.getvalue())
        z.writestr(f"{name}/byteorder", "little")
        for k, b in blobs.items():
            z.writestr(f"{name}/data/{k}", b)
        z.writestr(f"{name}/version", "3\n")


if __name__ == "__main__":
    main()
