"""`python -m harmony render|parse`: outputs, and exit code 2 with one stderr line on bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from harmony_completions import Spec, completion_ids
from harmony_oracle import oracle_render

from harmony import cli, tokens

REQUEST = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}


def run_cli(monkeypatch, capsys, argv: list[str], stdin: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_python_dash_m_harmony_render_with_a_date():
    result = subprocess.run(
        [sys.executable, "-m", "harmony", "render", "--date", "2025-08-05"],
        input=json.dumps(REQUEST),
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["tokens"] == oracle_render(REQUEST, "2025-08-05")
    assert "Current date: 2025-08-05" in output["text"] and output["text"].endswith("<|start|>assistant")


def test_render_without_a_date_writes_no_date_line(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, ["render"], json.dumps(REQUEST))
    assert code == 0
    assert json.loads(out)["tokens"] == oracle_render(REQUEST, None)
    assert "Current date" not in json.loads(out)["text"]


def test_parse_prints_messages(monkeypatch, capsys):
    ids = completion_ids(
        [
            Spec("analysis", "hmm"),
            Spec("commentary", "{}", recipient="functions.f", constrained=True, terminator=tokens.CALL),
        ]
    )
    code, out, _ = run_cli(monkeypatch, capsys, ["parse"], json.dumps(ids))
    assert code == 0
    assert json.loads(out) == {
        "messages": [
            {
                "role": "assistant",
                "channel": "analysis",
                "recipient": None,
                "content_type": None,
                "content": "hmm",
            },
            {
                "role": "assistant",
                "channel": "commentary",
                "recipient": "functions.f",
                "content_type": "<|constrain|>json",
                "content": "{}",
            },
        ],
        "error": None,
    }


@pytest.mark.parametrize("ids", [[200007, 1, 2], [200006], [-5, 10**12, 200008], []])
def test_parse_reports_malformed_token_lists_with_exit_0(monkeypatch, capsys, ids):
    code, out, _ = run_cli(monkeypatch, capsys, ["parse"], json.dumps(ids))
    assert code == 0
    assert isinstance(json.loads(out)["error"], str)


@pytest.mark.parametrize(
    ("argv", "stdin"),
    [
        (["render"], "{not json"),
        (["render"], json.dumps({"messages": [{"role": "wizard", "content": "x"}]})),
        (["render"], json.dumps({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]})),
        (["render"], json.dumps([1, 2])),
        (["render", "--date", "05/08/2025"], json.dumps(REQUEST)),
        (["parse"], "[1, 2, "),
        (["parse"], json.dumps({"tokens": [1]})),
        (["parse"], json.dumps([1, "2"])),
        (["frobnicate"], ""),
    ],
)
def test_bad_input_exits_2_with_one_line(monkeypatch, capsys, argv, stdin):
    code, out, err = run_cli(monkeypatch, capsys, argv, stdin)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: ")
