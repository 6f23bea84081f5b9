"""What a device reports about itself, and the named tiers the simulation uses.

A tier is a typical device class with its memory for training, sustained training throughput
and link speeds. The figures are deliberately round: they feed the planner's cost model and
the simulation's delay model, not a promise about any particular phone.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

GIB = 1024**3
MBIT = 1e6 / 8  # bytes per second in one megabit per second


@dataclass(frozen=True)
class Capabilities:
    memory_bytes: int = 0                   # memory the device can give to training
    flops_per_second: float = 0.0           # sustained training throughput
    uplink_bytes_per_second: float = 0.0
    downlink_bytes_per_second: float = 0.0
    tier: str = ""                          # free-form label for logs ("phone", "laptop")
    # Measured backward cost of a frozen block relative to its forward (fedtune client
    # --calibrate); 0: the cost model's default.
    backward_factor: float = 0.0

    def at_least(self, other: "Capabilities") -> bool:
        """True when this device is at least as capable as ``other`` in every resource."""
        return (
            self.memory_bytes >= other.memory_bytes
            and self.flops_per_second >= other.flops_per_second
            and self.uplink_bytes_per_second >= other.uplink_bytes_per_second
            and self.downlink_bytes_per_second >= other.downlink_bytes_per_second
        )


# Memory is what a training job may take on the device (a phone app running in the
# background gets a few hundred MiB), not the device's total.
TIERS: dict[str, Capabilities] = {
    "phone": Capabilities(256 * 1024**2, 20e9, 10 * MBIT, 40 * MBIT, "phone"),
    "laptop": Capabilities(400 * 1024**2, 100e9, 50 * MBIT, 200 * MBIT, "laptop"),
    "server": Capabilities(32 * GIB, 2e12, 1000 * MBIT, 1000 * MBIT, "server"),
}


class ProfileError(ValueError):
    """A malformed device-profile file; the message names the entry and key."""


def tier(name: str) -> Capabilities:
    try:
        return TIERS[name]
    except KeyError:
        raise ProfileError(f"unknown device tier {name!r}; choose one of: {', '.join(sorted(TIERS))}") from None


def load_profiles(path: str | Path) -> list[Capabilities]:
    """Read a list of simulated devices from TOML.

    Each ``[[device]]`` entry names a ``tier`` (phone, laptop, server) and/or gives figures that
    override it (``memory_gb``, ``gflops``, ``uplink_mbps``, ``downlink_mbps``), plus ``count``
    (default 1) to repeat it::

        [[device]]
        tier = "phone"
        count = 3

        [[device]]
        tier = "laptop"
        memory_gb = 8
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"cannot read profiles {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise ProfileError(f"{path}: expected one or more [[device]] tables")
    unknown_top = sorted(set(data) - {"device"})
    if unknown_top:
        raise ProfileError(f"{path}: unknown key {unknown_top[0]!r} (expected [[device]] tables)")
    allowed = {"tier", "count", "memory_gb", "gflops", "uplink_mbps", "downlink_mbps"}
    devices: list[Capabilities] = []
    for i, entry in enumerate(entries):
        where = f"{path}: device[{i}]"
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ProfileError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(allowed))})")
        base = tier(entry["tier"]) if "tier" in entry else Capabilities(tier="custom")
        values = {f.name: getattr(base, f.name) for f in fields(Capabilities)}
        for key, field_name, factor in (
            ("memory_gb", "memory_bytes", GIB),
            ("gflops", "flops_per_second", 1e9),
            ("uplink_mbps", "uplink_bytes_per_second", MBIT),
            ("downlink_mbps", "downlink_bytes_per_second", MBIT),
        ):
            if key in entry:
                value = entry[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ProfileError(f"{where}: {key} must be a positive number, got {value!r}")
                values[field_name] = int(value * factor) if field_name == "memory_bytes" else float(value * factor)
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ProfileError(f"{where}: count must be a positive integer, got {count!r}")
        missing = [k for k in ("memory_bytes", "flops_per_second") if not values[k]]
        if missing:
            raise ProfileError(f"{where}: give a tier or {', '.join(missing)}")
        devices.extend([Capabilities(**values)] * count)
    return devices
