"""The integer fast path prices exactly as Pricer's Decimal path, or declines."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from agentledger.producers.linear_price import LinearPrices
from agentledger.producers.pricing import Pricer

T0 = 1_795_000_000_000
MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3"),
    ("openai", "gpt-4.1-nano"),
    ("anthropic", "claude-haiku-4-5"),
    ("anthropic", "claude-3-5-haiku-latest"),
    ("anthropic", "claude-sonnet-4-5"),
    ("google", "gemini-2.5-pro"),
    ("google", "gemini-2.0-flash"),
    ("deepseek", "deepseek-chat"),
    ("mistral", "mistral-large-latest"),
    ("custom", "negotiated"),
    ("custom", "fine"),
]
OVERRIDES = {
    "negotiated": (Decimal("0.1234"), Decimal("7.000000001")),
    "fine": (Decimal("0.0000000001"), Decimal(1)),  # finer than a nano-USD per 1M tokens
}
PRICER = Pricer(OVERRIDES)
LINEAR = LinearPrices(PRICER)


@st.composite
def usage(draw: st.DrawFn) -> tuple[int, int, int]:
    inp = draw(st.integers(0, 100_000_000))
    return inp, draw(st.integers(0, 100_000_000)), draw(st.integers(0, inp))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(MODELS), usage())
def test_fast_cost_equals_the_pricer(model: tuple[str, str], counts: tuple[int, int, int]) -> None:
    provider, name = model
    inp, out, cached = counts
    rates = LINEAR.rates(provider, name)
    slow = PRICER.price(
        provider, name, input_tokens=inp, output_tokens=out, cached_input_tokens=cached, at_ms=T0
    )
    if rates is None:
        return
    assert slow.priced
    assert LINEAR.cost(rates, inp, out, cached) == slow.cost_nano_usd
    assert rates.version == slow.pricing_version


def test_which_sheets_take_the_fast_path() -> None:
    assert LINEAR.rates("openai", "gpt-4o") is not None
    assert LINEAR.rates("custom", "negotiated") is not None
    assert LINEAR.rates("custom", "fine") is None  # not a whole nano-USD per 1M tokens
    assert LINEAR.rates("openai", "no-such-model") is None  # unpriced: Pricer says why
    fast = sum(LINEAR.rates(p, m) is not None for p, m in MODELS)
    assert fast >= 8, "most common sheets should be flat"


def test_half_even_rounding_of_the_last_nano() -> None:
    # $0.0005 per 1M tokens is half a nano-USD per token: 0.5 rounds to 0, 1.5 and 2.5 to 2,
    # as usd_to_nano does.
    pricer = Pricer({"half": (Decimal("0.0005"), Decimal("0.0015"))})
    linear = LinearPrices(pricer)
    rates = linear.rates("x", "half")
    assert rates is not None
    for inp, out in [(1, 0), (3, 0), (0, 1), (0, 3), (5, 7)]:
        slow = pricer.price(
            "x", "half", input_tokens=inp, output_tokens=out, cached_input_tokens=0, at_ms=T0
        )
        assert linear.cost(rates, inp, out, 0) == slow.cost_nano_usd
