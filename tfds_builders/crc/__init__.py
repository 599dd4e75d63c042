"""Registers the crc builder with TFDS on import."""
from tfds_builders.crc.crc_dataset_builder import Builder  # noqa: F401
