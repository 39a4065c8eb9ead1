"""The text log format: one line per event, values bare only when nothing in them can confuse
a reader or a log parser."""

from __future__ import annotations

import io
import json
import logging

import pytest

from dkim_sidecar import logs


@pytest.mark.parametrize(
    "value",
    ["4ABCDEF", "192.0.2.10", "2001:db8::25", "example.com", "s1,s2", "rsa-sha256", "1.25", 42],
)
def test_plain_values_go_bare(value: object) -> None:
    assert logs._text(value) == str(value)


@pytest.mark.parametrize(
    "value",
    ["", "two words", 'a"b', "k=v", "line\nbreak", "cr\rhere", "tab\t", "nul\0", "é", "a\u2028b"],
)
def test_other_values_are_json_strings(value: str) -> None:
    text = logs._text(value)
    assert text.startswith('"') and json.loads(text) == value
    assert "\n" not in text and "\r" not in text and "\u2028" not in text


@pytest.fixture
def root_logger(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """setup_logging changes process-wide state: the root logger's handlers and level, and
    four switches of the logging module. All of it goes back after the test, so the tests
    after this one log (and capture logs) as before."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    return root


def test_a_message_line_is_one_line_whatever_its_values(
    monkeypatch: pytest.MonkeyPatch, root_logger: logging.Logger
) -> None:
    out = io.StringIO()
    logs.setup_logging("text", logging.INFO)
    assert root_logger.handlers[0].formatter is not None
    monkeypatch.setattr(root_logger.handlers[0], "stream", out)
    logs.event(logging.INFO, "signed", queue_id="Q1\nforged line", domain="example.com")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(' signed queue_id="Q1\\nforged line" domain=example.com')
