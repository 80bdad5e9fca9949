"""Properties of the per-sample counter-based random streams (fundiff.rng)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fundiff import NoiseStream, rng
from fundiff.testing import seeds, shapes

Z = 5.0  # standard errors allowed by the statistical tests (two-sided p ~ 6e-7 each)

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output)
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    """Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3")
    reproduces the published known-answer vectors of Random123 (kat_vectors), also when the
    counters sit in a batch with other counters."""
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    out = rng.philox4x32(*words, *key)
    assert tuple(int(w) for w in out) == expected
    batch = [torch.tensor([c, 1, c], dtype=torch.int64) for c in counter]
    out = rng.philox4x32(*batch, *key)
    assert tuple(int(w[0]) for w in out) == expected and tuple(int(w[2]) for w in out) == expected


@given(
    seed=seeds(),
    stream=st.integers(0, 65535),
    draw=st.integers(0, 2**32 - 1),
    ids=st.lists(st.integers(0, 2**40), min_size=1, max_size=12, unique=True),
    shape=shapes(),
)
@example(seed=0, stream=0, draw=0, ids=[0], shape=(1,))
@example(seed=2**64 - 1, stream=65535, draw=2**32 - 1, ids=[2**40, 0, 2**32], shape=(5, 5, 5))
def test_sample_independent_of_batch(seed, stream, draw, ids, shape):
    """Row i of normal() / uniform() depends only on (seed, stream, draw, sample id): the
    same in any batch, at any position, bit for bit."""
    full_n = rng.normal(seed, stream, draw, ids, shape)
    full_u = rng.uniform(seed, stream, draw, ids, shape)
    assert full_n.shape == (len(ids), *shape) and full_n.dtype == torch.float64
    rev = list(reversed(ids))
    assert torch.equal(rng.normal(seed, stream, draw, rev, shape), full_n.flip(0))
    for j, i in enumerate(ids):
        assert torch.equal(rng.normal(seed, stream, draw, [i], shape)[0], full_n[j])
        assert torch.equal(rng.uniform(seed, stream, draw, [i], shape)[0], full_u[j])
    stream_obj = NoiseStream(seed, ids, shape, stream=stream, dtype=torch.float64)
    assert torch.equal(stream_obj.normal(draw), full_n)
    assert torch.equal(stream_obj.normal(draw), stream_obj.normal(draw))


@given(seed=st.integers(0, 2**64 - 2), stream=st.integers(0, 65534), draw=st.integers(0, 2**32 - 2), sample=st.integers(0, 2**40))
@example(seed=0, stream=0, draw=0, sample=0)
@example(seed=2**32 - 1, stream=0, draw=2**32 - 2, sample=2**32 - 1)
def test_seeds_streams_draws_and_samples_differ(seed, stream, draw, sample):
    """Changing any one of seed, stream, draw or sample id changes the numbers (16 values
    from 4 Philox blocks; an accidental match has probability ~2^-512). The 64-bit seed uses
    both key words and sample ids beyond 2^32 reach the counter's high words."""
    shape = (16,)
    base = rng.uniform(seed, stream, draw, [sample], shape)
    assert not torch.equal(base, rng.uniform(seed + 1, stream, draw, [sample], shape))
    assert not torch.equal(base, rng.uniform(seed ^ (1 << 40), stream, draw, [sample], shape))
    assert not torch.equal(base, rng.uniform(seed, stream + 1, draw, [sample], shape))
    assert not torch.equal(base, rng.uniform(seed, stream, draw + 1, [sample], shape))
    assert not torch.equal(base, rng.uniform(seed, stream, draw, [sample + 1], shape))
    assert not torch.equal(base, rng.uniform(seed, stream, draw, [sample ^ (1 << 33)], shape))
    # elements within a sample differ too (distinct counters, not one value repeated)
    assert base.unique().numel() == 16


def test_counter_fields_do_not_alias():
    """Counter = (element block, draw, sample id, stream), each field in its own bits. Values
    that do not fit are refused: draw 2^32 at sample 0 used to give the same numbers as
    draw 0 at sample 2^32 (both high parts were xor-ed into one word), stream 65536 the same
    as stream 0, and negative ids left the uint32 domain Philox is defined on. The largest
    valid values still work and differ from their neighbours."""
    top = rng.normal(0, 65535, 2**32 - 1, [2**48 - 1], (4,))
    assert torch.isfinite(top).all()
    assert not torch.equal(top, rng.normal(0, 65535, 2**32 - 1, [2**48 - 2], (4,)))
    assert not torch.equal(rng.normal(0, 1, 0, [2**32], (4,)), rng.normal(0, 1, 0, [0], (4,)))
    with pytest.raises(ValueError, match="draw"):
        rng.normal(0, 1, 2**32, [0], (4,))
    with pytest.raises(ValueError, match="draw"):
        rng.uniform(0, 1, -1, [0], (4,))
    with pytest.raises(ValueError, match="stream"):
        rng.normal(0, 65536, 0, [0], (4,))
    with pytest.raises(ValueError, match="sample id"):
        rng.normal(0, 1, 0, [-1], (4,))
    with pytest.raises(ValueError, match="sample id"):
        rng.normal(0, 1, 0, [2**48], (4,))


@pytest.mark.parametrize("seed", [0, 12345, 2**64 - 1])
def test_normal_moments(seed):
    """Box-Muller normals from Philox uniforms: over n = 2^17 values the mean is within
    Z / sqrt(n) of 0, the variance within Z sqrt(2 / n) of 1 (the CLT standard error of a
    normal's sample variance, (m4 - 1) / n with m4 = 3), the fourth moment within Z
    sqrt(96 / n) of 3 (var(z^4) = 105 - 9), and adjacent values are uncorrelated (|corr| <=
    Z / sqrt(n / 2))."""
    z = rng.normal(seed, 1000, 0, torch.arange(4096), (32,)).flatten()
    n = z.numel()
    assert abs(z.mean().item()) <= Z / math.sqrt(n)
    assert abs(z.var().item() - 1.0) <= Z * math.sqrt(2.0 / n)
    assert abs((z**4).mean().item() - 3.0) <= Z * math.sqrt(96.0 / n)
    pairs = z.reshape(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item()) <= Z / math.sqrt(n / 2)


@pytest.mark.parametrize("seed", [0, 987654321])
def test_uniform_moments_and_open_interval(seed):
    """Uniforms lie in the open interval (0, 1) (bits + 1/2 over 2^32, so even all-zero and
    all-one words stay inside), with mean 1/2 and variance 1/12 within Z standard errors
    (sqrt(1/12 / n) and sqrt((1/80 - 1/144) / n), the CLT errors for U(0, 1))."""
    u = rng.uniform(seed, 1000, 0, torch.arange(4096), (32,)).flatten()
    n = u.numel()
    assert ((u > 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) <= Z * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) <= Z * math.sqrt((1 / 80 - 1 / 144) / n)
    edges = rng._uniform_from_bits(torch.tensor([0, 2**32 - 1], dtype=torch.int64))
    assert 0 < edges[0].item() < 1e-9 and 1 - 1e-9 < edges[1].item() < 1
    assert torch.isfinite(rng.normal(seed, 1000, 0, torch.arange(4), (3,))).all()


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3", None])
def test_seed_validation(bad):
    """Seeds are integers in [0, 2^64); anything else is refused with a message saying so."""
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^64\)"):
        rng.normal(bad, 1, 0, [0], (2,))
    with pytest.raises(ValueError, match="seed"):
        rng.uniform(bad, 1, 0, [0], (2,))
    with pytest.raises(ValueError, match="seed"):
        NoiseStream(bad, [0], (2,))


def test_noise_stream_device_dtype_and_streams():
    """NoiseStream converts to its dtype and switches streams without changing seed or ids."""
    s = NoiseStream(7, [3, 1], (2, 2), dtype=torch.float32)
    z = s.normal(0)
    assert z.dtype == torch.float32 and z.shape == (2, 2, 2)
    assert torch.equal(z, rng.normal(7, rng.STREAM_SAMPLER, 0, [3, 1], (2, 2)).float())
    other = s.with_stream(rng.STREAM_PRIOR)
    assert other.batch_size == 2 and not torch.equal(other.normal(0), z)
    assert torch.equal(other.normal(0), rng.normal(7, rng.STREAM_PRIOR, 0, [3, 1], (2, 2)).float())
