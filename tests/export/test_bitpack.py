"""The bit packer: exact round trip at 1..8 bits, ceil(n*b/8) bytes, bad input rejected."""

import numpy as np
import pytest

from sdq_lightning.export import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1000, 4097])
def test_round_trip(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 10_000 + count)
    v = rng.integers(0, 2**bits, size=count).astype(np.uint8)
    packed = pack_bits(v, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(count, bits) == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), v)


def test_layout_is_lsb_first() -> None:
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.array([0]), 9)
    with pytest.raises(ValueError, match="expected 1"):
        unpack_bits(np.zeros(2, np.uint8), 3, 2)
