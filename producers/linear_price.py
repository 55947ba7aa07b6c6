"""Integer pricing for the common case, on the agent's thread.

Most price sheets are three flat rates (input, cached input, output) per million tokens that
do not change with time. For those, the exact cost in nano-USD is an integer sum divided by
10**6 and rounded half-even, the same rounding ``usd_to_nano`` applies to ``Pricer``'s Decimal
sum, so the result is identical (a test checks it against ``Pricer.price``). The rates are
worked out once per (provider, model). Tiered, time-dependent or per-request sheets, unknown
models, and rates finer than a nano-USD per million tokens are left to ``Pricer``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from decimal import Decimal

from genai_prices.types import ModelPrice

from .pricing import PRICING_VERSION, Pricer

__all__ = ["LinearPrices", "LinearRates"]

_NANO_PER_USD = 10**9
_PER = 1_000_000


@dataclass(frozen=True, slots=True)
class LinearRates:
    """Nano-USD per million tokens; ``version`` is the event's ``pricing_version``."""

    uncached: int
    cached: int
    output: int
    version: str


def _nano(rate: object) -> int | None:
    if rate is None:
        return 0
    if not isinstance(rate, Decimal) or not rate.is_finite() or rate < 0:
        return None
    scaled = rate * _NANO_PER_USD
    if scaled != scaled.to_integral_value():
        return None
    return int(scaled)


class LinearPrices:
    """Exact integer costs for flat, time-independent price sheets. Thread-safe."""

    def __init__(self, pricer: Pricer) -> None:
        self._pricer = pricer
        self._lock = threading.Lock()
        self._rates: dict[tuple[str, str], LinearRates | None] = {}

    def rates(self, provider: str, model: str) -> LinearRates | None:
        """The model's flat rates, or None when ``Pricer`` must price it."""
        key = (provider, model)
        try:
            return self._rates[key]
        except KeyError:
            found = self._work_out(provider, model)
            with self._lock:
                self._rates[key] = found
            return found

    def cost(
        self, rates: LinearRates, input_tokens: int, output_tokens: int, cached_input_tokens: int
    ) -> int:
        """Nano-USD for a call (``input_tokens`` includes the cached ones)."""
        total = (
            rates.uncached * (input_tokens - cached_input_tokens)
            + rates.cached * cached_input_tokens
            + rates.output * output_tokens
        )
        nano, rest = divmod(total, _PER)
        # Half-even, as usd_to_nano rounds.
        if rest * 2 > _PER or (rest * 2 == _PER and nano & 1):
            nano += 1
        return nano

    def _work_out(self, provider: str, model: str) -> LinearRates | None:
        pricer = self._pricer
        override = pricer._overrides.get(model)
        if override is not None:
            inp, out = _nano(override[0]), _nano(override[1])
            if inp is None or out is None:
                return None
            # Pricer bills cached input at the input rate of an override.
            return LinearRates(inp, inp, out, f"override {override[0]}/{override[1]} per 1M")
        found = pricer._lookup(provider, model)
        if isinstance(found, str):
            return None
        _provider, info = found
        if not isinstance(info.prices, ModelPrice):  # conditional prices change with time
            return None
        sheet = pricer._sheet(info.prices)
        if sheet is None or sheet.tiered:
            return None
        uncached, output = _nano(sheet.input), _nano(sheet.output)
        # Without a cache-read rate, Pricer bills cached tokens as ordinary input.
        cached = uncached if sheet.cache_read is None else _nano(sheet.cache_read)
        if uncached is None or cached is None or output is None:
            return None
        return LinearRates(uncached, cached, output, PRICING_VERSION)
