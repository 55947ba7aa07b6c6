"""The stall watch: which partitions count as stalled, and how remedies escalate."""

from __future__ import annotations

import pytest

from agentledger.stream_processors.stall import PartitionView, Remedy, StallWatch, recovery_views

STALL_S = 10.0


def run(watch: StallWatch[str], view: PartitionView, times: list[float]) -> list[Remedy | None]:
    """Observe one partition with an unchanged view at each time; the remedy due each time."""
    return [watch.observe({"calls:0": view}, now).get("calls:0") for now in times]


def test_waiting_records_without_progress_escalate_seek_seek_rejoin_unhealthy() -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    stuck = PartitionView(delivered=None, committed=40, end=100)
    got = run(watch, stuck, [0, 5, 10, 15, 20, 30, 40, 50])
    assert got == [
        None,
        None,
        Remedy.SEEK,
        None,
        Remedy.SEEK,
        Remedy.REJOIN,
        Remedy.UNHEALTHY,
        Remedy.UNHEALTHY,
    ]
    assert watch.unhealthy == {"calls:0"}


def test_progress_clears_the_stall_and_the_unhealthy_mark() -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    stuck = PartitionView(delivered=None, committed=40, end=100)
    run(watch, stuck, [0, 10, 20, 30, 40])
    assert watch.unhealthy == {"calls:0"}
    moving = PartitionView(delivered=41, committed=40, end=100)
    assert run(watch, moving, [41, 45]) == [None, None]
    assert watch.unhealthy == set()
    # A new stall starts its ladder from the first seek again.
    assert run(watch, moving, [51, 61]) == [Remedy.SEEK, Remedy.SEEK]


@pytest.mark.parametrize(
    "view",
    [
        PartitionView(delivered=None, committed=100, end=100),  # nothing past the commit
        PartitionView(delivered=99, committed=50, end=100),  # delivered up to the end
        PartitionView(delivered=None, committed=None, end=100),  # offsets unknown
        PartitionView(delivered=None, committed=0, end=None),
    ],
)
def test_a_quiet_or_unknown_partition_is_never_stalled(view: PartitionView) -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    assert run(watch, view, [0, 10, 20, 30, 40, 100]) == [None] * 6
    assert watch.unhealthy == set()


def test_partitions_that_leave_the_assignment_are_forgotten() -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    stuck = PartitionView(delivered=None, committed=0, end=5)
    run(watch, stuck, [0, 10, 20, 30, 40])
    assert watch.unhealthy == {"calls:0"}
    assert watch.observe({"calls:1": stuck}, 41) == {}
    assert watch.unhealthy == set()
    # Back again: counted from scratch.
    assert run(watch, stuck, [42, 51, 52]) == [None, None, Remedy.SEEK]


def test_reset_forgets_everything() -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    stuck = PartitionView(delivered=3, committed=0, end=50)
    run(watch, stuck, [0, 10, 20, 30, 40])
    watch.reset()
    assert watch.unhealthy == set()
    assert run(watch, stuck, [41, 50, 51]) == [None, None, Remedy.SEEK]


def test_stall_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_after_s must be > 0"):
        StallWatch(0)


def test_a_recovery_read_to_its_highwater_is_done_and_one_short_of_it_stalls() -> None:
    # faust's highwater is the offset of the last changelog record (Kafka's end offset - 1).
    views = recovery_views(
        ["changelog:0", "changelog:1", "changelog:2", "changelog:3"],
        offsets={"changelog:0": 41, "changelog:1": 40, "changelog:2": -1, "changelog:3": None},
        highwaters={"changelog:0": 41, "changelog:1": 41, "changelog:2": -1, "changelog:3": 9},
    )
    assert views == {
        "changelog:0": PartitionView(delivered=41, committed=None, end=42),
        "changelog:1": PartitionView(delivered=40, committed=None, end=42),
        "changelog:2": PartitionView(delivered=-1, committed=None, end=0),
    }
    watch: StallWatch[str] = StallWatch(STALL_S)
    due = [watch.observe(views, now) for now in (0, 5, 10)]
    # Only the partition one record short of its highwater waits; the empty one is done.
    assert due == [{}, {}, {"changelog:1": Remedy.SEEK}]


def test_a_recovery_that_reads_on_is_never_stalled() -> None:
    watch: StallWatch[str] = StallWatch(STALL_S)
    for now, offset in enumerate(range(0, 300, 10)):
        views = recovery_views(["changelog:0"], {"changelog:0": offset}, {"changelog:0": 1000})
        assert watch.observe(views, now * 5.0) == {}
