"""Product quantiser: code shapes, bits, and asymmetric distances."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histojax.models.quantizer import ProductQuantizer, adc_scores


def test_codes_and_bits():
  pq = ProductQuantizer(16, num_codebooks=4, codebook_size=256, rngs=nnx.Rngs(0))
  codes = pq.encode(jnp.ones((5, 16)))
  assert codes.shape == (5, 4) and codes.dtype == jnp.int32
  assert pq.bits == 32
  assert int(codes.max()) < 256


def test_adc_equals_dot_product_with_reconstruction():
  rng = np.random.default_rng(0)
  pq = ProductQuantizer(12, num_codebooks=3, codebook_size=8, rngs=nnx.Rngs(1))
  database = jnp.asarray(rng.normal(size=(20, 12)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
  codes = pq.encode(database)
  np.testing.assert_allclose(adc_scores(pq.lookup_tables(queries), codes), queries @ pq.decode(codes).T,
                             rtol=1e-5, atol=1e-5)


def test_hard_codes_pick_the_nearest_codeword():
  pq = ProductQuantizer(4, num_codebooks=2, codebook_size=2, rngs=nnx.Rngs(0))
  pq.codebooks[...] = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
  codes = pq.encode(jnp.array([[0.9, 0.1, 0.2, 0.8]]))
  assert codes.tolist() == [[0, 1]]
  np.testing.assert_allclose(pq.decode(codes), [[1.0, 0.0, 0.0, 1.0]])


def test_soft_quantisation_approaches_hard_as_temperature_falls():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  pq = ProductQuantizer(8, num_codebooks=2, codebook_size=4, temperature=1e-3, rngs=nnx.Rngs(3))
  np.testing.assert_allclose(pq.soft_quantize(x), pq.decode(pq.encode(x)), atol=1e-4)


def test_bad_shapes_name_the_field():
  with pytest.raises(ValueError, match="num_codebooks=3"):
    ProductQuantizer(16, num_codebooks=3, codebook_size=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="codebook_size"):
    ProductQuantizer(16, num_codebooks=4, codebook_size=6, rngs=nnx.Rngs(0))
