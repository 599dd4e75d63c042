"""Parts chosen by name from config: models, objectives, ...

A registry maps a name to a builder and to that builder's default config, so
`base_config(model="resnet")` knows every field a resnet accepts and a typo in
`--config.model.widht` fails instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections


class Registry:
  """Name -> (builder, default config) for one kind of part."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, tuple[Any, Callable[[], ml_collections.ConfigDict]]] = {}

  def register(self, name: str, defaults: Callable[[], ml_collections.ConfigDict]):
    def decorator(builder):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = (builder, defaults)
      return builder
    return decorator

  def names(self) -> list[str]:
    return sorted(self._entries)

  def _entry(self, name: str):
    if name not in self._entries:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
    return self._entries[name]

  def get(self, name: str):
    return self._entry(name)[0]

  def defaults(self, name: str) -> ml_collections.ConfigDict:
    """A fresh default config for `name`, with `name` filled in."""
    cfg = self._entry(name)[1]()
    cfg.name = name
    return cfg
