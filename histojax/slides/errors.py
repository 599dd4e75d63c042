"""The named ways a whole-slide image is refused. Each message names the file.

Callers (a builder, `search --slides`, `index add --slides`) catch `SlideError`
to skip or stop on one slide without losing what they already wrote; the
subclasses say why, so a report can count slides that had no tissue apart
from files that were never slides.
"""

from __future__ import annotations


class SlideError(ValueError):
  """A file or folder that cannot be used as a whole-slide image."""


class NotASlideError(SlideError):
  """Not a format OpenSlide reads as a slide (a photo, a text file, an empty folder...)."""


class DamagedSlideError(SlideError):
  """OpenSlide opened the slide but failed reading its pixel data."""


class TruncatedSlideError(DamagedSlideError):
  """The file ends before the data its header declares (an interrupted copy or download)."""


class NoResolutionError(SlideError):
  """The slide declares no usable microns per pixel, and no override was given."""


class SlideTooLargeError(SlideError):
  """Declared dimensions or level count over the limits; nothing was allocated for them."""


class ResolutionTooCoarseError(SlideError):
  """The slide is scanned coarser than the microns per pixel asked for: reading would upsample."""


class NoTissueError(SlideError):
  """No tissue was found on the slide (glass, or only pen marks)."""
