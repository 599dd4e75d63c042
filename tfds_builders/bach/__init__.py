"""Registers the bach builder with TFDS on import."""
from tfds_builders.bach.bach_dataset_builder import Builder  # noqa: F401
