"""The device inventory: which boards a bundle's sub-models may be placed on.

An inventory file is YAML (``.yaml``/``.yml``) or JSON (``.json``)::

    devices:
      - {id: pi-1, memory_mb: 512, speed: 1.0}
      - {id: jetson, memory_mb: 2048, speed: 4.0}

``memory_mb`` is what the device can give to sub-models; ``speed`` is relative throughput:
1.0 is the reference machine the sub-models' latencies were measured on, 2.0 runs them in
half the time. Every error is a one-line ConfigError that names the file and the entry.
No torch here: this runs on the boards too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edvit.errors import ConfigError

# Memory of each device made by identical_devices(): large enough that memory never binds,
# which is what `--num-devices N` means (nothing known about the boards but their number).
UNLIMITED_MEMORY_MB = 1_048_576.0
YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)


class Device(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    memory_mb: float = Field(gt=0, allow_inf_nan=False)
    speed: float = Field(default=1.0, gt=0, allow_inf_nan=False)


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: tuple[Device, ...]

    @model_validator(mode="after")
    def _valid(self) -> Inventory:
        if not self.devices:
            raise ValueError("an inventory needs at least one device")
        duplicate = _first_duplicate([d.id for d in self.devices])
        if duplicate is not None:
            raise ValueError(f"duplicate device id {duplicate!r}")
        return self

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(d.id for d in self.devices)

    @property
    def total_memory_mb(self) -> float:
        return sum(d.memory_mb for d in self.devices)


def identical_devices(
    n: int,
    memory_mb: float = UNLIMITED_MEMORY_MB,
    speed: float = 1.0,
) -> Inventory:
    """The `--num-devices N` shortcut: n equal devices named node-0 .. node-{n-1}."""
    if n < 1:
        raise ConfigError(f"--num-devices must be at least 1, not {n}")
    devices = tuple(Device(id=f"node-{i}", memory_mb=memory_mb, speed=speed) for i in range(n))
    return Inventory(devices=devices)


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file; every problem is a one-line ConfigError."""
    path = Path(path)
    raw = _read_document(path)
    entries = _device_entries(raw, path)
    devices = tuple(_parse_device(entry, number, path) for number, entry in enumerate(entries, 1))
    _check_unique_ids(devices, path)
    return Inventory(devices=devices)


def _read_document(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in YAML_SUFFIXES + JSON_SUFFIXES:
        raise ConfigError(f"{path}: an inventory must be .yaml, .yml or .json, not {suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: inventory file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read inventory: {exc}") from None
    if suffix in JSON_SUFFIXES:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line_yaml_error(exc)})") from None


def _one_line_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines; keep the problem and where it is."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _device_entries(raw: Any, path: Path) -> list[Any]:
    if not isinstance(raw, dict) or "devices" not in raw:
        raise ConfigError(f"{path}: expected a mapping with a 'devices' list at the top level")
    unknown = sorted(str(key) for key in raw if key != "devices")
    if unknown:
        raise ConfigError(f"{path}: unknown top-level field {unknown[0]!r}")
    entries = raw["devices"]
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'devices' must be a list of devices")
    if not entries:
        raise ConfigError(f"{path}: 'devices' is empty; list at least one device")
    return entries


def _parse_device(entry: Any, number: int, path: Path) -> Device:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: device #{number}: expected a mapping with id and memory_mb")
    where = _entry_name(entry, number)
    try:
        return Device.model_validate(entry)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {where}: {_first_error(exc)}") from None


def _entry_name(entry: dict[str, Any], number: int) -> str:
    device_id = entry.get("id")
    if isinstance(device_id, str) and device_id:
        return f"device #{number} (id {device_id!r})"
    return f"device #{number}"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"missing field {field!r}"
    if error["type"] == "extra_forbidden":
        return f"unknown field {field!r} (fields: id, memory_mb, speed)"
    return f"{field}: {error['msg']}"


def _check_unique_ids(devices: tuple[Device, ...], path: Path) -> None:
    first_entry: dict[str, int] = {}
    for number, device in enumerate(devices, 1):
        if device.id in first_entry:
            raise ConfigError(
                f"{path}: duplicate device id {device.id!r} "
                f"(entries #{first_entry[device.id]} and #{number})"
            )
        first_entry[device.id] = number


def _first_duplicate(ids: list[str]) -> str | None:
    seen: set[str] = set()
    for device_id in ids:
        if device_id in seen:
            return device_id
        seen.add(device_id)
    return None
