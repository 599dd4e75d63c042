"""TFDS's own `tfds build` command, started without the `tfds` entry point.

    python -m tfds_builders.tfds_build bach --imports tfds_builders --config x10_256 \
        --manual_dir DIR --data_dir DIR --file_format array_record \
        --beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing

The `tfds` script of tensorflow-datasets 4.9.10 imports TensorFlow at start-up
(for its `convert_format` command), and TensorFlow must not be installed next
to scann, so `tfds build` stops with "No module named 'tensorflow'" here. Its
build command does not need TensorFlow: this runs that command, with the same
flags, unchanged.
"""

from __future__ import annotations

import sys

import simple_parsing
from tensorflow_datasets.scripts.cli import build


def main(argv: list[str]) -> None:
  simple_parsing.parse(build.Args, args=argv).execute()


if __name__ == "__main__":
  main(sys.argv[1:])
