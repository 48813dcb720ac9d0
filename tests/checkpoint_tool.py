#!/usr/bin/python3
"""Reads shardprop checkpoints with h5py alone, as docs/checkpoint-format.md describes.

  checkpoint_tool.py verify FILE            recompute the CRC-32 and compare it with the file's
  checkpoint_tool.py same A B               parameters and optimizer state bit for bit equal
  checkpoint_tool.py close A B TOLERANCE    parameters within TOLERANCE of each tensor's max
  checkpoint_tool.py finite FILE            every parameter and optimizer value is finite
  checkpoint_tool.py sha256 FILE            SHA-256 of the parameters (float32, little-endian,
                                            W then b of each layer)
"""
import hashlib
import sys
import zlib

import h5py
import numpy as np


def layers(f):
    return sorted(f["params"], key=lambda name: int(name.split("_")[1]))


def tensors(f):
    """The file's float32 tensors in checksum order: parameters, then each optimizer slot."""
    names = [f"params/{l}/{p}" for l in layers(f) for p in ("W", "b")]
    kind = f["optimizer"].attrs["kind"]
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    slots = ["m", "v"] if kind == "adam" else ["velocity"]
    names += [f"optimizer/{s}/{l}/{p}" for s in slots for l in layers(f) for p in ("W", "b")]
    return names


def verify(path):
    with h5py.File(path, "r") as f:
        crc = 0
        for name in tensors(f):
            crc = zlib.crc32(np.ascontiguousarray(f[name][()], dtype="<f4").tobytes(), crc)
        stored = int(f.attrs["checksum_crc32"])
        assert crc == stored, f"{path}: crc32 {crc:08x}, file says {stored:08x}"
        print(f"{path}: step {int(f.attrs['step'])}, crc32 {crc:08x} verified")


def finite(path):
    with h5py.File(path, "r") as f:
        for name in tensors(f):
            assert np.isfinite(f[name][()]).all(), f"{path}: {name} holds NaN or Inf"
        print(f"{path}: every value is finite")


def same(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for name in tensors(fa):
            x, y = fa[name][()], fb[name][()]
            assert x.tobytes() == y.tobytes(), f"{name} differs between {a} and {b}"
        print(f"{a} and {b}: identical parameters and optimizer state")


def close(a, b, tolerance):
    worst = 0.0
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert int(fa.attrs["step"]) == int(fb.attrs["step"]), "different steps"
        for l in layers(fa):
            for p in ("W", "b"):
                x, y = fa[f"params/{l}/{p}"][()], fb[f"params/{l}/{p}"][()]
                scale = max(float(np.abs(x).max()), 1e-30)
                worst = max(worst, float(np.abs(x - y).max()) / scale)
    assert worst <= tolerance, f"parameters differ by {worst:.3g} > {tolerance}"
    print(f"{a} and {b}: parameters differ by {worst:.3g} of each tensor's largest entry")


def sha256(path):
    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for l in layers(f):
            for p in ("W", "b"):
                digest.update(np.ascontiguousarray(f[f"params/{l}/{p}"][()], dtype="<f4").tobytes())
    print(f"{digest.hexdigest()}  {path}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"verify": verify, "finite": finite, "same": same, "sha256": sha256,
     "close": lambda a, b, t: close(a, b, float(t))}[command](*args)
