"""PolicyBook: the in-memory view of the compacted policies topic."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from agentledger.schemas import BudgetPolicy, Period, parse_policy_file
from agentledger.stream_processors.policies import PolicyBook
from agentledger.stream_processors.tracking import plan_for


def record(policy: BudgetPolicy) -> tuple[bytes, bytes]:
    return policy.key.encode(), policy.model_dump_json().encode()


def test_records_add_replace_and_tombstones_delete() -> None:
    book = PolicyBook()
    daily = BudgetPolicy(scope="agent:x", limit_usd=Decimal("5"))
    weekly = BudgetPolicy(scope="agent:x", period=Period.WEEK, limit_usd=Decimal("20"))
    assert book.apply(*record(daily)) is None
    assert book.apply(*record(weekly)) is None
    assert len(book) == 2

    raised = BudgetPolicy(scope="agent:x", limit_usd=Decimal("7.5"))
    assert book.apply(*record(raised)) is None
    assert book.policies["agent:x|day"].limit_nano_usd == 7_500_000_000

    assert book.apply(b"agent:x|day", None) is None
    assert book.apply(b"agent:x|week", b"") is None
    assert len(book) == 0
    # Deleting what is not there is fine: compaction may replay a tombstone.
    assert book.apply(b"agent:x|day", None) is None


def test_bad_records_are_rejected_with_a_reason_and_change_nothing() -> None:
    book = PolicyBook()
    good = BudgetPolicy(scope="agent:x", limit_usd=Decimal("5"))
    book.apply(*record(good))

    reason = book.apply(b"agent:x|day", b"{not json")
    assert reason is not None
    assert "not a valid BudgetPolicy" in reason
    reason = book.apply(b"agent:x|day", b'{"scope": "agent:x", "limit_usd": "-1"}')
    assert reason is not None
    assert "limit_usd" in reason
    reason = book.apply(b"agent:y|day", good.model_dump_json().encode())
    assert reason is not None
    assert "does not match" in reason
    assert book.apply(None, good.model_dump_json().encode()) is not None
    assert book.apply(b"\xff\xfe", b"") is not None

    assert dict(book.policies) == {"agent:x|day": good}


def test_version_moves_only_when_the_policies_change() -> None:
    book = PolicyBook()
    daily = BudgetPolicy(scope="agent:x", limit_usd=Decimal("5"))
    book.apply(*record(daily))
    after_add = book.version
    book.apply(*record(daily))  # compaction and restarts replay the same record
    book.apply(b"agent:x|day", b"{bad")
    book.apply(b"agent:nobody|day", None)
    assert book.version == after_add == 1
    book.apply(b"agent:x|day", None)
    assert book.version == 2


PROCESSOR_README = Path(__file__).resolve().parents[2] / "stream_processors" / "README.md"
README_BLOCKS = re.findall(r"```yaml\n(.*?)```", PROCESSOR_README.read_text(), flags=re.DOTALL)


def test_every_processor_readme_example_parses_and_plans() -> None:
    assert len(README_BLOCKS) >= 2
    plans = []
    for block in README_BLOCKS:
        policies = parse_policy_file(block, source="stream_processors/README.md").budgets
        assert policies
        book = PolicyBook()
        for policy in policies:
            assert book.apply(policy.key.encode(), policy.model_dump_json().encode()) is None
        assert book.plan == plan_for(policies)  # the book's cached plan follows its policies
        plans.append(book.plan)
    v3 = plans[-1]
    assert v3.zones == {"Europe/Paris"} and v3.concurrency and v3.spawn
    assert v3.run_idles == (30 * 60_000,)
    # The rolling 24h window (24-minute slots) and the 5m burn-rate window (30 s slots).
    assert v3.slots == ((30_000, 65 * 60_000), (24 * 60_000, 24 * 3_600_000))
