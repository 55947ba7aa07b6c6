"""Call cost: exactly what genai-prices says, to the nano-USD, through the shim's fast path."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from agentledger.config import Settings
from agentledger.producers import (
    PRICING_VERSION,
    InMemoryTransport,
    Ledger,
    Pricer,
    UnpricedModelWarning,
)
from agentledger.schemas import CallEvent, usd_to_nano
from tests.conftest import TEST_CONTROL_KEY

AT_MS = 1_795_000_000_000  # 2026-11-18
AT = datetime.fromtimestamp(AT_MS / 1000, tz=UTC)


def genai_nano(provider: str, model: str, inp: int, out: int, cached: int) -> int:
    usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
    result = calc_price(usage, model_ref=model, provider_id=provider, genai_request_timestamp=AT)
    return usd_to_nano(result.total_price)


def make_ledger(**kwargs: object) -> tuple[Ledger, InMemoryTransport]:
    transport = InMemoryTransport()
    settings = Settings(control_key=SecretStr(TEST_CONTROL_KEY), topic_prefix="price.")
    ledger = Ledger(
        settings, transport=transport, start_control_listener=False, clock=lambda: AT_MS, **kwargs
    )  # type: ignore[arg-type]
    return ledger, transport


def emitted(transport: InMemoryTransport) -> list[CallEvent]:
    return [CallEvent.model_validate_json(value) for _t, _k, value in transport.messages]


MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet-latest"),
    ("anthropic", "claude-sonnet-4-5"),  # tiered above 200k input tokens
    ("google", "gemini-1.5-pro"),  # tiered
    ("deepseek", "deepseek-chat"),
    ("mistral", "mistral-large-latest"),
]
USAGES = [
    (1200, 300, 0),
    (1200, 300, 800),
    (10_000, 2_000, 0),
    (250_000, 4_000, 200_000),
    (0, 0, 0),
    (1, 1, 1),
]


@pytest.mark.parametrize(("provider", "model"), MODELS)
@pytest.mark.parametrize(("inp", "out", "cached"), USAGES)
def test_cost_equals_genai_prices(
    provider: str, model: str, inp: int, out: int, cached: int
) -> None:
    price = Pricer().price(
        provider,
        model,
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=cached,
        at_ms=AT_MS,
    )
    assert price.priced
    assert price.pricing_version == PRICING_VERSION
    assert price.cost_nano_usd == genai_nano(provider, model, inp, out, cached)


def test_known_value_from_the_notes() -> None:
    # NOTES.md: gpt-4o at 10,000 input + 2,000 output tokens costs 0.045 USD.
    price = Pricer().price(
        "openai",
        "gpt-4o",
        input_tokens=10_000,
        output_tokens=2_000,
        cached_input_tokens=0,
        at_ms=AT_MS,
    )
    assert price.cost_nano_usd == 45_000_000


def test_cached_tokens_are_cheaper_when_the_model_has_a_cache_rate() -> None:
    pricer = Pricer()
    full = pricer.price(
        "openai", "gpt-4o", input_tokens=10_000, output_tokens=0, cached_input_tokens=0, at_ms=AT_MS
    )
    cached = pricer.price(
        "openai",
        "gpt-4o",
        input_tokens=10_000,
        output_tokens=0,
        cached_input_tokens=10_000,
        at_ms=AT_MS,
    )
    assert 0 < cached.cost_nano_usd < full.cost_nano_usd


def test_every_model_in_the_snapshot_prices_like_genai_prices() -> None:
    """The fast path must agree with genai-prices for every sheet it accepts, and refuse what
    genai-prices refuses."""
    pricer = Pricer()
    checked = 0
    mismatches: list[str] = []
    for provider in get_snapshot().providers:
        for model in provider.models:
            for inp, out, cached in [(1200, 300, 800), (250_001, 77, 3)]:
                ours = pricer.price(
                    provider.id,
                    model.id,
                    input_tokens=inp,
                    output_tokens=out,
                    cached_input_tokens=cached,
                    at_ms=AT_MS,
                )
                try:
                    theirs = genai_nano(provider.id, model.id, inp, out, cached)
                except (LookupError, ValueError):
                    if ours.priced:
                        mismatches.append(f"{provider.id}/{model.id}: genai-prices refuses it")
                    continue
                checked += 1
                if not ours.priced or ours.cost_nano_usd != theirs:
                    mismatches.append(
                        f"{provider.id}/{model.id} {inp}/{out}/{cached}: {ours} != {theirs}"
                    )
    assert checked > 3000
    assert mismatches == []


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    inp=st.integers(0, 2_000_000),
    out=st.integers(0, 200_000),
    cached_share=st.fractions(0, 1),
)
def test_cost_matches_for_any_usage(
    model: tuple[str, str], inp: int, out: int, cached_share: object
) -> None:
    cached = int(inp * cached_share)  # type: ignore[operator]
    price = Pricer().price(
        model[0],
        model[1],
        input_tokens=inp,
        output_tokens=out,
        cached_input_tokens=cached,
        at_ms=AT_MS,
    )
    assert price.cost_nano_usd == genai_nano(model[0], model[1], inp, out, cached)


def test_ledger_event_carries_the_exact_cost() -> None:
    ledger, transport = make_ledger()
    agent = ledger.agent("researcher-1", workflow="wf-1", pool="research")
    with agent.call(provider="anthropic", model="claude-3-5-sonnet-latest") as call:
        call.record(input_tokens=5000, output_tokens=700, cached_input_tokens=4000)
    (event,) = emitted(transport)
    assert event.cost_nano_usd == genai_nano(
        "anthropic", "claude-3-5-sonnet-latest", 5000, 700, 4000
    )
    assert event.priced is True
    assert event.pricing_version == PRICING_VERSION


def test_unknown_model_is_recorded_unpriced_with_a_warning() -> None:
    ledger, transport = make_ledger()
    agent = ledger.agent("researcher-1")
    with (
        pytest.warns(UnpricedModelWarning, match="no-such-model-9000"),
        agent.call(provider="openai", model="no-such-model-9000") as call,
    ):
        call.record(input_tokens=1000, output_tokens=100)
    (event,) = emitted(transport)
    assert (event.priced, event.cost_nano_usd, event.pricing_version) == (False, 0, None)
    assert event.input_tokens == 1000
    assert ledger.stats["unpriced"] == 1


def test_unknown_provider_is_recorded_unpriced_with_a_warning() -> None:
    ledger, transport = make_ledger()
    with (
        pytest.warns(UnpricedModelWarning, match="my-local-vllm"),
        ledger.agent("a").call(provider="my-local-vllm", model="gpt-4o"),
    ):
        pass
    assert [e.priced for e in emitted(transport)] == [False]


def test_known_model_does_not_warn() -> None:
    ledger, _ = make_ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ledger.agent("a").call(provider="openai", model="gpt-4o") as call:
            call.record(input_tokens=1, output_tokens=1)


def test_price_override_is_exact_and_wins() -> None:
    overrides = {"my-finetune": (Decimal("0.30"), Decimal("1.20"))}
    ledger, transport = make_ledger(price_overrides=overrides)
    with ledger.agent("a").call(provider="openai", model="my-finetune") as call:
        call.record(input_tokens=1_234_567, output_tokens=7_654_321, cached_input_tokens=1000)
    (event,) = emitted(transport)
    expected = Decimal("0.30") * 1_234_567 / 1_000_000 + Decimal("1.20") * 7_654_321 / 1_000_000
    assert event.cost_nano_usd == usd_to_nano(expected) == 9_555_555_300
    assert event.priced is True
    assert event.pricing_version is not None and "override" in event.pricing_version


def test_bad_override_names_the_model() -> None:
    with pytest.raises(ValueError, match=r"price_overrides\['m'\]"):
        Pricer({"m": (Decimal("0.1"), 0.5)})  # type: ignore[dict-item]
