"""Philox4x32-10: known answers, the element mapping, and the keep-rate statistics (every
backend's words against these: tests/test_kernels.py)."""
import numpy as np
import pytest

from fastreg.kernels.philox import (dropout_threshold, keep_mask, philox4x32,
                                    philox4x32_block, philox_words, split_seed)

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_scalar_and_vectorised(counter, key, expected):
    assert tuple(int(w) for w in philox4x32(*counter, *key)) == expected
    assert tuple(int(w) for w in philox4x32_block([counter], key)[0]) == expected


def test_word_for_element_is_counter_element_div_4():
    seed, step, layer, stream = 12345678901, 7, 2, 0
    words = philox_words(10, seed, step, layer, stream)
    k0, k1 = split_seed(seed)
    for e in range(10):
        assert words[e] == philox4x32(e // 4, step, layer, stream, k0, k1)[e % 4]


def test_streams_steps_layers_give_different_bits():
    base = philox_words(64, 1, 0, 0, 0)
    for other in (philox_words(64, 1, 1, 0, 0), philox_words(64, 1, 0, 1, 0),
                  philox_words(64, 1, 0, 0, 1), philox_words(64, 2, 0, 0, 0)):
        assert (base != other).mean() > 0.9


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_statistics(rate):
    n = 200_000
    keep = keep_mask((n,), dropout_threshold(rate), 99, 3, 1, 0)
    # binomial standard deviation of the kept fraction: sqrt(p(1-p)/n) ~ 1e-3; 6 sigma
    assert abs(keep.mean() - (1 - rate)) < 6 * np.sqrt(rate * (1 - rate) / n)


def test_threshold_edges():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert keep_mask((100,), 0, 1, 2, 3, 0).all()
