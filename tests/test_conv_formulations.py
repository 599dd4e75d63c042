"""bench/conv_formulations.py: every formulation it times computes the same values."""

import numpy as np

from bench import conv_formulations


def test_formulations_agree_with_histojax_forward_and_kernel_gradient():
  for formulations in (conv_formulations.KERNEL_GRADIENT, conv_formulations.FORWARD):
    rows = conv_formulations.run(layers=((2, 5, 3), (1, 4, 6)), reps=1, formulations=formulations)
    for row in rows:
      for name in formulations:
        assert row[name]["max_rel_diff"] < 1e-5, (row["px"], name, row[name])
        assert row[name]["ms"] > 0


def test_flat_offset_ignores_rows_that_wrap():
  # Non-square input: a wrong row length would mix image rows and fail against the windows form.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
  dy = rng.standard_normal((2, 5, 7, 4)).astype(np.float32)
  pad = ((1, 1), (1, 1))
  np.testing.assert_allclose(conv_formulations.flat_offset(x, dy, pad), conv_formulations.windows(x, dy, pad),
                             rtol=1e-5, atol=1e-5)
