"""Hash-masked dropout: deterministic in the key, uniform bits, the right keep rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hstu.dropout import Dropout, hash_bits


def test_hash_bits_deterministic_and_key_dependent():
    key = jax.random.key(0)
    a, b = hash_bits(key, (64, 33)), hash_bits(key, (64, 33))
    np.testing.assert_array_equal(a, b)
    c = hash_bits(jax.random.fold_in(key, 1), (64, 33))
    assert np.mean(np.asarray(a) == np.asarray(c)) < 0.01


def test_hash_bits_are_uniform_and_uncorrelated():
    bits = np.asarray(hash_bits(jax.random.key(3), (1000, 1000)), np.uint64)
    counts = np.bincount((bits >> 28).ravel().astype(np.int64), minlength=16)  # top 4 bits
    chi2 = np.sum((counts - 1e6 / 16) ** 2 / (1e6 / 16))
    assert chi2 < 50, chi2  # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5
    for shift in (0, 16):  # low bits and high half too
        low = ((bits >> shift) & 1).astype(np.float64)
        assert abs(low.mean() - 0.5) < 5 * 0.5 / 1000
    u = bits.astype(np.float64) / 2**32
    for axis in (0, 1):  # neighbours along either axis
        x, y = (u[1:], u[:-1]) if axis == 0 else (u[:, 1:], u[:, :-1])
        assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_keep_rate_and_scaling(rate):
    x = jnp.ones((500, 400))
    y = np.asarray(Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=1)))
    kept = y != 0
    sigma = np.sqrt(rate * (1 - rate) / x.size)
    assert abs(kept.mean() - (1 - rate)) < 5 * sigma
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(Dropout(rate)(x, deterministic=True), x)
    with pytest.raises(ValueError, match="rngs"):
        Dropout(rate)(x, deterministic=False)
    with pytest.raises(ValueError, match="rate"):
        Dropout(1.0)
