"""TFDS data sources -> Grain pipelines -> global batches on the mesh."""
