"""Byte units and the one way localllm prints a size.

Inside localllm every size is an int of bytes; GiB and MiB appear only when printing.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024**2
GIB = 1024**3
GB = 1000**3


def gib(n_bytes: float, digits: int = 1, unit: bool = True) -> str:
    """`gib(25_769_803_776)` -> '24.0 GiB'; `unit=False` leaves the number alone (tables)."""
    text = f"{n_bytes / GIB:.{digits}f}"
    return f"{text} GiB" if unit else text


def mib(n_bytes: float, digits: int = 0, unit: bool = True) -> str:
    text = f"{n_bytes / MIB:.{digits}f}"
    return f"{text} MiB" if unit else text
