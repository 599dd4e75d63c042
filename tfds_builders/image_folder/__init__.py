"""Registers the image_folder builder with TFDS on import."""
from tfds_builders.image_folder.image_folder_dataset_builder import Builder  # noqa: F401
