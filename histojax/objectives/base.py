"""The objective registry and the contract every objective keeps.

An objective is built from its config into `loss_fn(model, batch, rng) ->
(loss, aux)`: `batch` holds *global* arrays (every device's rows), so
similarities over the batch include negatives from all devices; `aux` is a
dict of scalar diagnostics that end up in the training log.
"""

from histojax.registry import Registry

OBJECTIVES = Registry("objective")
