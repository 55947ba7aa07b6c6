"""Exact money: integer nano-USD inside the pipeline, Decimal at the edges.

Floats never touch a cost. A nano-USD (1e-9 USD) is finer than any per-token price published
today (the cheapest are around 1e-8 USD per token), so conversions from provider prices are exact.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

__all__ = ["NANO_PER_USD", "format_usd", "nano_to_usd", "usd_to_nano"]

NANO_PER_USD = 1_000_000_000
_NANO = Decimal("0.000000001")
_CENT = Decimal("0.01")


def usd_to_nano(usd: Decimal | int | str) -> int:
    """Convert USD to integer nano-USD, rounding half-even below one nano-USD.

    Floats are refused: they cannot represent most cent values exactly.
    """
    if isinstance(usd, float):
        raise TypeError("money must be Decimal, int or str, never float (it is not exact)")
    amount = Decimal(usd)
    if not amount.is_finite():
        raise ValueError(f"money must be a finite number, got {usd!r}")
    return int(
        (amount.quantize(_NANO, rounding=ROUND_HALF_EVEN) * NANO_PER_USD).to_integral_value()
    )


def nano_to_usd(nano: int) -> Decimal:
    """Convert integer nano-USD to an exact Decimal USD amount."""
    return (Decimal(nano) / NANO_PER_USD).quantize(_NANO)


def format_usd(nano: int) -> str:
    """Money as people read it, the one format of every report, message and CLI table:
    `$1,234.50`, `$0.000123`, `$0.00`, `-$2.50`: at least cents, more digits only when they
    are not zero (exact to the nano-USD), thousands grouped, the sign before the `$`."""
    amount = nano_to_usd(abs(nano)).normalize()
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        # Whole dollars and dimes get their cents; normalize() also turns 0E-9 into 0.
        amount = amount.quantize(_CENT)
    return f"{'-' if nano < 0 else ''}${amount:,f}"
