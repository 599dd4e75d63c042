"""Registers the bracs builder with TFDS on import."""
from tfds_builders.bracs.bracs_dataset_builder import Builder  # noqa: F401
