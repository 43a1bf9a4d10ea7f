"""Vectorised little-endian bit packing of unsigned integer codes at 1..8 bits per value (numpy, no loops)."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values at ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (int(count) * int(bits) + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes in ``[0, 2**bits)`` into a ``uint8`` array of :func:`packed_nbytes` bytes.

    Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, least significant bit first.
    """
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits!r}")
    v = np.asarray(values).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] to pack at {bits} bits, "
                         f"got [{v.min()}, {v.max()}]")
    v = v.astype(np.uint8)
    if bits == 8:
        return v.copy()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)[None, :]) & 1  # (n, bits), LSB first
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes (``uint8``) from the packed bytes."""
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits!r}")
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size != packed_nbytes(count, bits):
        raise ValueError(f"packed data holds {data.size} bytes, expected {packed_nbytes(count, bits)} for "
                         f"{count} values at {bits} bits")
    if bits == 8:
        return data.copy()
    planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)[None, :]).sum(axis=1, dtype=np.uint8)
