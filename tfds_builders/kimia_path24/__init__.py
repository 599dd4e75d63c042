"""Registers the kimia_path24 builder with TFDS on import."""
from tfds_builders.kimia_path24.kimia_path24_dataset_builder import Builder  # noqa: F401
