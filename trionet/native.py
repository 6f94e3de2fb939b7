"""The compiled core (``trionet._native``), with a clear error when it is missing."""

from __future__ import annotations

try:
    from trionet._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "trionet's native core is not built: install the package (pip install .) "
        "or run `python native/build_native.py` in the source tree"
    ) from exc

__all__ = ["ffi", "lib", "strerror"]


def strerror(code: int) -> str:
    """Text of a ``TN_E_*`` ring error code."""
    return str(ffi.string(lib.tn_strerror(code)).decode())
