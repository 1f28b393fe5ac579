"""The CRC-32C that every durable record carries (csrc/fmq_crc.c).

The core computes it with the CPU's crc32 instruction where there is one and
with tables elsewhere; a queue file written on one machine may be recovered
on another, so both must give the standard CRC-32C value for every length
and alignment. NATIVE ONLY: the pure backend keeps no record checksums.
"""
from __future__ import annotations

import random

import pytest

core = pytest.importorskip("fastmq._core", reason="the C core is not built")


def _reference(data: bytes) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), as specified."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("portable", [False, True], ids=["by_cpu", "tables"])
def test_the_record_checksum_is_the_standard_crc32c(portable):
    assert core._crc32c(b"123456789", portable) == 0xE3069283     # the check value
    assert core._crc32c(b"", portable) == 0
    rng = random.Random(7)
    blob = rng.randbytes(300)
    for n in list(range(0, 40)) + [63, 64, 65, 127, 128, 129, 255, 256, 299]:
        for start in (0, 1, 3, 7):          # every alignment of the 8-byte steps
            data = blob[start:start + n]
            assert core._crc32c(data, portable) == _reference(data), (n, start)


def test_the_instruction_and_the_tables_agree_on_large_inputs():
    rng = random.Random(11)
    for n in (4096, 65537, 1 << 20):
        data = rng.randbytes(n)
        assert core._crc32c(data, False) == core._crc32c(data, True)


@pytest.mark.parametrize("portable", [False, True], ids=["by_cpu", "tables"])
def test_long_inputs_give_the_standard_value_at_every_stride_boundary(portable):
    # The instruction path cuts long inputs into strides of three lanes
    # (3 x 1024 B, then 3 x 128 B) and joins their CRCs: every length on
    # either side of a stride, and every alignment, must still give the
    # specified value.
    rng = random.Random(13)
    blob = rng.randbytes(7000)
    lengths = [383, 384, 385, 767, 768, 769, 3071, 3072, 3073, 3072 + 384, 3072 + 391,
               4096, 4100, 6144, 6144 + 384 + 7]
    for n in lengths:
        for start in (0, 5):
            data = blob[start:start + n]
            assert core._crc32c(data, portable) == _reference(data), (n, start)
