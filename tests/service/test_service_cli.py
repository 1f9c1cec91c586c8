"""`mondeq serve`'s flags: generated from the settings, one per setting, values reaching the
settings, bad values refused in one line with exit code 2."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from service.cli import ALIASES, FILE_FLAGS, add_arguments, flag, settings_from_args
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_mondeq_variables(monkeypatch):
    """The flags alone decide (a MONDEQ_* variable of the shell running the tests must not)."""
    import os

    for key in list(os.environ):
        if key.startswith("MONDEQ_"):
            monkeypatch.delenv(key)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mondeq serve")
    add_arguments(p)
    return p


def parse(*argv: str) -> Settings:
    return settings_from_args(parser().parse_args(list(argv)))


def test_every_setting_has_exactly_one_flag():
    p = parser()
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in p._actions:
        if action.dest != "help":
            by_dest.setdefault(action.dest, []).append(action)
    assert sorted(by_dest) == sorted(Settings.model_fields)
    assert all(len(actions) == 1 for actions in by_dest.values())
    spelled = {dest: actions[0].option_strings for dest, actions in by_dest.items()}
    assert spelled["max_batch_size"] == ["--max-batch-size"]
    assert spelled["poll_interval_s"] == ["--poll-interval-s", "--poll-interval"]  # old alias
    assert spelled["tune_at_load"] == ["--tune-at-load", "--no-tune-at-load"]
    assert spelled["admin_token"] == ["--admin-token-file"]
    for name in Settings.model_fields:
        expected = FILE_FLAGS.get(name, "--" + name.replace("_", "-"))
        assert flag(name) == expected and spelled[name][0] == expected
    # Every flag the docs used before the flags were generated still parses.
    for old in ("--model-dir", "--host", "--port", "--device", "--max-batch-size"):
        assert any(old in a.option_strings for a in p._actions)
    assert set(ALIASES) <= set(Settings.model_fields)


def test_help_shows_each_description_default_and_variable(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: "worst-case" stays one word
    text = parser().format_help()
    assert "--device {auto,cpu,cuda}" in text
    assert "--log-level {critical,error,warning,info,debug}" in text
    flat = " ".join(text.split())
    for name, field in Settings.model_fields.items():
        assert f"MONDEQ_{name.upper()}" in flat, name
        assert " ".join(field.description.split()) in flat, name
    assert "rows per solve (1 turns batching off) (default: 64; MONDEQ_MAX_BATCH_SIZE)" in flat
    assert "(default: true; MONDEQ_TUNE_AT_LOAD)" in flat
    assert "a command line is visible to every user of the machine (ps)" in flat


def test_a_value_of_every_flag_reaches_the_settings(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    values = {  # one value per setting, none of them the default
        "model_dir": ("/srv/models", Path("/srv/models")),
        "host": ("0.0.0.0", "0.0.0.0"),
        "port": ("8123", 8123),
        "grpc_port": ("8124", 8124),
        "device": ("CPU", "cpu"),
        "log_level": ("debug", "debug"),
        "workers": ("3", 3),
        "max_batch_size": ("32", 32),
        "max_delay_ms": ("12.5", 12.5),
        "max_gap_ms": ("3", 3.0),
        "max_queue": ("100", 100),
        "max_request_batch": ("50", 50),
        "max_solving_rows": ("600", 600),
        "max_body_bytes": ("4096", 4096),
        "max_image_pixels": ("1000000", 1_000_000),
        "graceful_timeout_s": ("5", 5.0),
        "min_tol": ("1e-5", 1e-5),
        "max_iter_cap": ("400", 400),
        "max_row_iterations": ("20000", 20_000),
        "stop": ("LOGITS", "logits"),
        "logit_tol": ("0.25", 0.25),
        "poll_interval_s": ("0", 0.0),
        "settle_s": ("0.5", 0.5),
        "tune_at_load": (None, False),
        "calibration_size": ("32", 32),
        "recent_size": ("128", 128),
        "retune_factor": ("2", 2.0),
        "retune_window": ("256", 256),
        "retune_cooldown_s": ("30", 30.0),
        "admin_token": (str(token), "s3cret"),
    }
    assert sorted(values) == sorted(Settings.model_fields)
    argv = []
    for name, (text, _) in values.items():
        argv += ["--no-tune-at-load"] if text is None else [flag(name), text]
    settings = parse(*argv)
    got = settings.model_dump()
    got["admin_token"] = settings.admin_token.get_secret_value()
    assert got == {name: value for name, (_, value) in values.items()}
    assert Settings().model_dump() != got  # none of them was the default


def test_unset_flags_leave_the_variables_and_defaults(monkeypatch):
    monkeypatch.setenv("MONDEQ_MAX_QUEUE", "7")
    monkeypatch.setenv("MONDEQ_TUNE_AT_LOAD", "false")
    monkeypatch.setenv("MONDEQ_ADMIN_TOKEN", "from-env")
    settings = parse("--poll-interval", "2.5", "--tune-at-load")
    assert settings.poll_interval_s == 2.5  # the old spelling
    assert settings.tune_at_load is True  # the flag wins over the variable
    assert settings.max_queue == 7  # the variable, no flag given
    assert settings.admin_token.get_secret_value() == "from-env"
    assert settings.max_batch_size == Settings.model_fields["max_batch_size"].default


def serve(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.mark.parametrize(
    ("argv", "last_line"),
    [
        (
            ["--max-batch-size", "abc"],
            "python -m service: error: argument --max-batch-size: invalid int value: 'abc'",
        ),
        (
            ["--device", "tpu"],
            "python -m service: error: argument --device: invalid choice: 'tpu' "
            "(choose from 'auto', 'cpu', 'cuda')",
        ),
        (
            ["--admin-token-file", "missing-token"],
            "python -m service: error: argument --admin-token-file: cannot read "
            "missing-token: No such file or directory",
        ),
        (
            ["--admin-token-file", "empty-token"],
            "python -m service: error: argument --admin-token-file: empty-token holds no "
            "token (it is empty)",
        ),
        (
            ["--max-batch-size", "0", "--poll-interval", "-1"],
            "mondeq serve: --max-batch-size: input should be greater than or equal to 1, got 0; "
            "--poll-interval: input should be greater than or equal to 0, got -1.0",
        ),
        (
            ["--max-delay-ms", "inf"],
            "mondeq serve: --max-delay-ms: input should be a finite number, got inf",
        ),
        (
            ["--stop", "logits"],
            "mondeq serve: MONDEQ_LOGIT_TOL: value error, stop logits needs a logit_tol, the "
            "logit accuracy (--logit-tol), got None",
        ),
        (
            ["--stop", "logits", "--logit-tol", "0"],
            "mondeq serve: --logit-tol: input should be greater than 0, got 0.0",
        ),
        (
            ["--model-dir", "empty-token"],
            "mondeq serve: --model-dir empty-token: a file, not a folder of models "
            "(<name>/<version>/model.pt)",
        ),
        (
            ["--stop", "proof"],
            "python -m service: error: argument --stop: invalid choice: 'proof' "
            "(choose from 'tol', 'label', 'logits')",
        ),
    ],
)
def test_a_bad_value_is_one_clear_line_and_exit_code_2(tmp_path, argv, last_line):
    (tmp_path / "empty-token").write_text("\n")
    run = serve(*argv, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == last_line
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_literal_choices_are_the_settings_literals():
    p = parser()
    for name, field in Settings.model_fields.items():
        if typing.get_origin(field.annotation) is typing.Literal:
            (action,) = [a for a in p._actions if a.dest == name]
            assert list(action.choices) == list(typing.get_args(field.annotation))


def test_the_settings_table_of_the_docs_lists_every_setting():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    table = docs.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `MONDEQ_")]
    listed = {v for row in rows for v in re.findall(r"`MONDEQ_([A-Z_]+)`", row.split("|")[1])}
    assert {f"{n.upper()}" for n in Settings.model_fields} <= listed
    assert listed - {n.upper() for n in Settings.model_fields} == {"TUNE_MALLOC"}  # not a setting
