"""Product quantiser: code shapes, bits, and asymmetric distances."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histojax import pq
from histojax.models.quantizer import ProductQuantizer


def test_codes_and_bits():
  quantizer = ProductQuantizer(16, num_codebooks=4, codebook_size=256, rngs=nnx.Rngs(0))
  codes = quantizer.encode(jnp.ones((5, 16)))
  assert codes.shape == (5, 4) and codes.dtype == jnp.int32
  assert quantizer.bits == 32
  assert int(codes.max()) < 256


def test_training_codes_match_search_codes_and_adc():
  """The quantiser's codes are the ones `histojax.pq` (export, search) computes."""
  rng = np.random.default_rng(0)
  quantizer = ProductQuantizer(12, num_codebooks=3, codebook_size=8, rngs=nnx.Rngs(1))
  database = rng.normal(size=(20, 12)).astype(np.float32)
  queries = rng.normal(size=(4, 12)).astype(np.float32)
  books = np.asarray(quantizer.unit_codebooks())
  codes = np.asarray(quantizer.encode(jnp.asarray(database)))
  np.testing.assert_array_equal(pq.encode(database, books), codes)
  np.testing.assert_allclose(pq.reconstruct(codes, books), quantizer.decode(jnp.asarray(codes)), atol=1e-6)
  np.testing.assert_allclose(pq.adc_scores(pq.tables(queries, books), codes),
                             queries @ pq.reconstruct(codes, books).T, rtol=1e-5, atol=1e-5)


def test_hard_codes_pick_the_nearest_codeword():
  quantizer = ProductQuantizer(4, num_codebooks=2, codebook_size=2, rngs=nnx.Rngs(0))
  quantizer.codebooks[...] = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
  codes = quantizer.encode(jnp.array([[0.9, 0.1, 0.2, 0.8]]))
  assert codes.tolist() == [[0, 1]]
  np.testing.assert_allclose(quantizer.decode(codes), [[1.0, 0.0, 0.0, 1.0]])


def test_soft_quantisation_approaches_hard_as_temperature_falls():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  quantizer = ProductQuantizer(8, num_codebooks=2, codebook_size=4, temperature=1e-3, rngs=nnx.Rngs(3))
  np.testing.assert_allclose(quantizer.soft_quantize(x), quantizer.decode(quantizer.encode(x)), atol=1e-4)


def test_bad_shapes_name_the_field():
  with pytest.raises(ValueError, match="num_codebooks=3"):
    ProductQuantizer(16, num_codebooks=3, codebook_size=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="codebook_size"):
    ProductQuantizer(16, num_codebooks=4, codebook_size=6, rngs=nnx.Rngs(0))
