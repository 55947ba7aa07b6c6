"""Exact call cost from genai-prices, fast enough for the agent's own thread.

``genai_prices.calc_price`` costs about 200 us a call, nearly all of it in the generic unit
decomposition. The shim only ever reports input, cached-input and output tokens, so for the
price sheets that bill nothing else (plain or tiered per-million-token prices) the same
arithmetic is done here directly on the cached ``ModelPrice``: the same Decimals, the same
formula (``price * count / 1_000_000``, tiers chosen by total input tokens), so the result is
identical. Any other price sheet goes through genai-prices' own ``calc_price``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

from agentledger.schemas import usd_to_nano

__all__ = ["PRICING_VERSION", "Price", "PriceOverride", "Pricer"]

PRICING_VERSION = f"genai-prices {genai_prices.__version__}"
_PER = Decimal(1_000_000)

PriceOverride = tuple[Decimal, Decimal]
"""(USD per 1M input tokens, USD per 1M output tokens); cached input pays the input rate."""

# Every other unit (cache writes, audio, web searches, ...) is one the shim never reports, so
# genai-prices counts it as 0 and it adds nothing; the exception is a per-request price, which
# bills every call, so such sheets take the slow path.
_PER_REQUEST_KEY = "requests_kcount"

_Rate = Decimal | TieredPrices


@dataclass(frozen=True)
class Price:
    """The outcome of pricing one call."""

    cost_nano_usd: int
    priced: bool
    pricing_version: str | None
    problem: str | None = None
    """why the call could not be priced, for the UnpricedModelWarning"""


@dataclass(frozen=True)
class _Sheet:
    """The three rates that matter to the shim, taken from one ``ModelPrice``."""

    input: _Rate | None
    cache_read: _Rate | None
    output: _Rate | None
    tiered: bool


def _rate(rate: _Rate | None, count: int, total_input: int) -> Decimal:
    if rate is None or count == 0:
        return Decimal(0)
    if isinstance(rate, TieredPrices):
        applicable = rate.base
        for tier in reversed(rate.tiers):
            if total_input > tier.start:
                applicable = tier.price
                break
        return applicable * count / _PER
    return rate * count / _PER


def _sheet_for(price: ModelPrice) -> _Sheet | None:
    """The fast-path view of ``price``, or None when it needs genai-prices' general path."""
    rates = {k: v for k, v in vars(price).items() if not k.startswith("_") and v is not None}
    if _PER_REQUEST_KEY in rates:
        return None
    if not all(isinstance(v, Decimal | TieredPrices) for v in rates.values()):
        return None
    return _Sheet(
        input=rates.get("input_mtok"),
        cache_read=rates.get("cache_read_mtok"),
        output=rates.get("output_mtok"),
        tiered=any(isinstance(v, TieredPrices) for v in rates.values()),
    )


def _when(at_ms: int) -> datetime:
    try:
        return datetime.fromtimestamp(at_ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        # A broken injected clock must not fail the call; its event is rejected later anyway.
        return datetime.now(tz=UTC)


class Pricer:
    """Prices calls; caches model lookups and fast-path price sheets. Thread-safe."""

    def __init__(self, overrides: Mapping[str, PriceOverride] | None = None) -> None:
        self._overrides = dict(overrides or {})
        for model, pair in self._overrides.items():
            if len(pair) != 2 or not all(
                isinstance(p, Decimal) and p.is_finite() and p >= 0 for p in pair
            ):
                raise ValueError(
                    f"price_overrides[{model!r}] must be (input, output) USD per 1M tokens as two "
                    f"finite non-negative Decimals, got {pair!r}"
                )
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], tuple[Provider, ModelInfo] | str] = {}
        # Keyed by id(ModelPrice); the value holds the ModelPrice itself so the id stays unique.
        self._sheets: dict[int, tuple[ModelPrice, _Sheet | None]] = {}

    def _lookup(self, provider: str, model: str) -> tuple[Provider, ModelInfo] | str:
        key = (provider, model)
        found = self._models.get(key)
        if found is None:
            try:
                found = get_snapshot().find_provider_model(model, None, provider, None)
            except LookupError as exc:
                found = str(exc)
            with self._lock:
                self._models[key] = found
        return found

    def _sheet(self, price: ModelPrice) -> _Sheet | None:
        cached = self._sheets.get(id(price))
        if cached is None or cached[0] is not price:
            cached = (price, _sheet_for(price))
            with self._lock:
                self._sheets[id(price)] = cached
        return cached[1]

    def price(
        self,
        provider: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        at_ms: int,
    ) -> Price:
        """Cost of one call; ``input_tokens`` includes the cached ones, as in genai-prices."""
        override = self._overrides.get(model)
        if override is not None:
            usd = (override[0] * input_tokens + override[1] * output_tokens) / _PER
            return Price(usd_to_nano(usd), True, f"override {override[0]}/{override[1]} per 1M")
        found = self._lookup(provider, model)
        if isinstance(found, str):
            return Price(0, False, None, found)
        provider_info, model_info = found
        when = _when(at_ms)
        model_price = model_info.get_prices(when)
        sheet = self._sheet(model_price)
        if sheet is None:
            try:
                usd = model_info.calc_price(
                    Usage(
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                        cache_read_tokens=cached_input_tokens,
                    ),
                    provider_info,
                    genai_request_timestamp=when,
                ).total_price
            except ValueError as exc:
                # genai-prices refuses usage it cannot decompose for this sheet (for example a
                # model billed per audio token); the call is reported, unpriced, not dropped.
                return Price(0, False, None, f"genai-prices cannot price {model!r}: {exc}")
            return Price(usd_to_nano(usd), True, PRICING_VERSION)
        total_input = input_tokens if sheet.tiered else 0
        # genai-prices bills the cached subset at the cache rate only when the sheet has one;
        # otherwise cached tokens are ordinary input tokens.
        cached = cached_input_tokens if sheet.cache_read is not None else 0
        usd = (
            _rate(sheet.input, input_tokens - cached, total_input)
            + _rate(sheet.cache_read, cached, total_input)
            + _rate(sheet.output, output_tokens, total_input)
        )
        return Price(usd_to_nano(usd), True, PRICING_VERSION)
