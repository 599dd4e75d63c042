"""Registers the slides builder with TFDS on import."""
from tfds_builders.slides.slides_dataset_builder import Builder  # noqa: F401
