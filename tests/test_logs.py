"""`--log-format json`: one JSON object per line, whatever a logged value holds."""

from __future__ import annotations

import json
import logging

from memserve.clients.cli import build_parser
from memserve.clients.cli.logs import JsonFormatter


def test_a_json_line_holds_a_forged_line_break_inside_its_field():
    record = logging.LogRecord(
        "memserve.api", logging.INFO, __file__, 1, "request %s done", ("a\nINFO x",), None
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "request a\nINFO x done" and entry["level"] == "INFO"
    assert entry["logger"] == "memserve.api" and entry["time"].endswith("Z")


def test_a_traceback_is_a_field_of_its_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("memserve", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["traceback"]


def test_serve_and_worker_take_the_option():
    parser = build_parser()
    assert parser.parse_args(["serve", "--log-format", "json"]).log_format == "json"
    assert parser.parse_args(["worker", "--log-format", "json"]).log_format == "json"
    assert parser.parse_args(["serve"]).log_format == "text"
