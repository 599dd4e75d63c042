"""Registers the synthetic_tissue builder with TFDS on import."""
from tfds_builders.synthetic_tissue.synthetic_tissue_dataset_builder import Builder
