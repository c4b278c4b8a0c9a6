"""Helpers for the frozen-dataclass configs of every stage.

Configs are plain frozen dataclasses validated in `__post_init__`. These helpers turn them into JSON (written
next to every output as `config.json`) and back, treating unknown keys as errors so a typo never passes
silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from pdx_tf import io_utils

ConfigT = TypeVar("ConfigT")


def to_dict(config: Any) -> dict[str, Any]:
  """A JSON-ready dict of a (possibly nested) dataclass config; tuples become lists."""
  return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(key): _jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(item) for item in value]
  return value


def from_dict(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
  """Builds dataclass `cls` from `values`, recursing into nested dataclass fields.

  Raises:
    ValueError: on keys that `cls` does not define (a typo must not be ignored).
  """
  hints = typing.get_type_hints(cls)
  names = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
  kwargs = {}
  for name, value in values.items():
    kwargs[name] = _coerce(hints.get(name), value)
  return cls(**kwargs)


def _coerce(hint: Any, value: Any) -> Any:
  """Turns JSON lists back into tuples and dicts into nested dataclasses, following the type hint."""
  if hint is None:
    return value
  if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
    return from_dict(hint, value)
  origin = typing.get_origin(hint)
  if origin is tuple and isinstance(value, list):
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(args[0], item) for item in value)
    if args and len(args) == len(value):
      return tuple(_coerce(arg, item) for arg, item in zip(args, value))
    return tuple(value)
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg is type(None):
        continue
      coerced = _coerce(arg, value)
      if coerced is not value:
        return coerced
  return value


def write_config(path: str, config: Any) -> None:
  """Writes the resolved config as canonical JSON, atomically."""
  io_utils.atomic_write_json(path, to_dict(config))


def config_hash(config: Any) -> str:
  """SHA-256 of the canonical JSON form of a config."""
  return io_utils.sha256_json(to_dict(config))
