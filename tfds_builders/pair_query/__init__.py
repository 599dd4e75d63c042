"""Registers the pair_query builder with TFDS on import."""
from tfds_builders.pair_query.pair_query_dataset_builder import Builder  # noqa: F401
