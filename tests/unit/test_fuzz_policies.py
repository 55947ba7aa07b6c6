"""Fuzzing policy files with hypothesis: arbitrary text, and field-level mutations of a valid
file. Parsing never raises anything but PolicyFileError, every error line reads
`file:line: field: problem` with the line of the offending field, and `agentledger budgets
apply` prints that error and exits 2 before touching Kafka."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentledger.cli import main
from agentledger.schemas import PolicyFile
from agentledger.schemas.policy import PolicyFileError, parse_policy_file

SOURCE = "budgets.yaml"
ERROR_LINE = re.compile(rf"^{re.escape(SOURCE)}:(\d+): (.+)", re.DOTALL)
# A field-level problem names the field's path; whole-file ones (not YAML, not a mapping) not.
FIELD = re.compile(r"^(budgets(?:\.\w+)*): ")

# One field per line, so a mutated field's line is known. (path in the error, line number)
TEMPLATE = [
    ("", "budgets:"),
    ("budgets.0.scope", "  - scope: {scope}"),
    ("budgets.0.period", "    period: {period}"),
    ("budgets.0.limit_usd", "    limit_usd: {limit_usd}"),
    ("", "    thresholds:"),
    ("budgets.0.thresholds.0.at_percent", "      - at_percent: {at_percent}"),
    ("budgets.0.thresholds.0.action", "        action: {action}"),
    ("", "    spike:"),
    ("budgets.0.spike.window", "      window: {window}"),
    ("budgets.0.spike.at_percent", "      at_percent: {spike_percent}"),
]
VALID = {
    "scope": "pool:research",
    "period": "week",
    "limit_usd": "100",
    "at_percent": "90",
    "action": "throttle:2",
    "window": "day",
    "spike_percent": "20",
}
FIELDS = sorted(VALID)

yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=2)
    ),
    max_leaves=5,
)


def render(values: dict[str, str]) -> str:
    return "\n".join(line.format(**values) for _, line in TEMPLATE) + "\n"


def line_of(field: str) -> int:
    key = next(i for i, (_, line) in enumerate(TEMPLATE) if "{" + field + "}" in line)
    return key + 1


def parse(text: str) -> PolicyFile | PolicyFileError:
    try:
        return parse_policy_file(text, source=SOURCE)
    except PolicyFileError as exc:
        return exc


def check_error(error: PolicyFileError) -> list[tuple[int, str]]:
    """Every problem reads `file:line: [field: ]problem`; return (line, field or "") pairs."""
    found = []
    for problem in str(error).split("\n" + SOURCE)[0:]:
        text = problem if problem.startswith(SOURCE) else SOURCE + problem
        match = ERROR_LINE.match(text)
        assert match, f"not `file:line: problem`: {text!r}"
        field = FIELD.match(match.group(2))
        found.append((int(match.group(1)), field.group(1) if field else ""))
    return found


def test_the_template_is_valid() -> None:
    parsed = parse(render(VALID))
    assert isinstance(parsed, PolicyFile), parsed
    assert str(parsed.budgets[0].limit_usd) == "100"


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_arbitrary_text_is_a_policy_file_or_a_located_error(text: str) -> None:
    parsed = parse(text)
    if isinstance(parsed, PolicyFileError):
        check_error(parsed)


@settings(max_examples=300)
@given(field=st.sampled_from(FIELDS), value=yaml_values)
def test_a_mutated_field_is_reported_at_its_line(field: str, value: object) -> None:
    # JSON is YAML: the mutated value is written as a JSON (flow) scalar or collection.
    parsed = parse(render(dict(VALID, **{field: json.dumps(value)})))
    if isinstance(parsed, PolicyFile):
        return
    located = check_error(parsed)
    assert all(where for _, where in located), f"a field problem without its field: {parsed}"
    path = next(p for p, line in TEMPLATE if "{" + field + "}" in line)
    named = [(line, where) for line, where in located if where.startswith(path)]
    if named:
        assert all(line == line_of(field) for line, _ in named), (located, parsed)
    else:
        # A rule across fields (e.g. the spike window must be shorter than the period) is
        # reported on the budget itself, at its first line.
        assert located == [(2, "budgets.0")], parsed


@pytest.mark.parametrize(
    "text",
    [
        "budgets: &a [*a]\n",  # a self-referencing alias
        "budgets:\n  - &b {scope: 'agent:a', limit_usd: 1, spike: *b}\n",
        "--- {}\n--- {}\n",  # two documents
        "budgets: [" * 50 + "]" * 50 + "\n",
        "budgets:\n  - scope: agent:a\n    limit_usd: 1e400\n",
        "budgets:\n  - scope: agent:a\n    limit_usd: .nan\n",
        "\t budgets: x",
    ],
)
def test_hostile_files(text: str) -> None:
    parsed = parse(text)
    assert isinstance(parsed, PolicyFileError), parsed
    check_error(parsed)


# capsys and monkeypatch are reset by hand per example (readouterr) or constant (the env).
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(FIELDS), value=yaml_values)
def test_budgets_apply_prints_the_located_error_and_exits_2(
    field: str,
    value: object,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("AGENTLEDGER_KAFKA", "127.0.0.1:9")
    monkeypatch.setenv("AGENTLEDGER_HOME", str(tmp_path / "home"))
    text = render(dict(VALID, **{field: json.dumps(value)}))
    if isinstance(parse(text), PolicyFile):
        return  # a valid file would be published; only rejections are under test here
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SOURCE
        path.write_text(text)
        capsys.readouterr()
        # No broker listens on port 9: a rejection must come before any connection.
        code = main(["budgets", "apply", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"agentledger: error: {path}:"), err
