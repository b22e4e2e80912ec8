"""The settings declaration (server/settings.py) and what is built from it: flags, GPTOSS_* env
vars, parse_settings, the README's configuration table and the engine's config."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig, resolve_dtype
from harmony.conversation import REASONING_EFFORTS
from server.cli import build_arg_parser, env_var_name, known_env_vars, parse_settings
from server.setting_values import format_bytes, parse_bytes
from server.settings import (
    DEFAULT_MODEL_NAME,
    ServerSettings,
    engine_config,
    settings_declaration,
    settings_table_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DECLARED = settings_declaration()
BY_NAME = {s.name: s for s in DECLARED}


def readme_table() -> str:
    text = README.read_text()
    match = re.search(r"<!-- settings-table:begin -->\n(.*?)<!-- settings-table:end -->", text, re.S)
    assert match, "README.md lost its <!-- settings-table:begin/end --> markers"
    return match.group(1)


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ=environ)
    assert exc.value.code == 2
    return capsys.readouterr().err


# -- the declaration ---------------------------------------------------------------------------------


def test_every_field_is_declared_and_the_dataclass_is_frozen():
    assert [s.name for s in DECLARED] == [f.name for f in dataclasses.fields(ServerSettings)]
    assert all(s.help for s in DECLARED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerSettings().port = 1  # type: ignore[misc]
    assert "scripted_tokens" not in BY_NAME  # test doubles live in tests/, not in the product


def test_declared_defaults_are_the_documented_contract():
    s = ServerSettings()
    assert (s.host, s.port, s.model, s.served_model_name, s.api_keys) == ("0.0.0.0", 8000, None, [], [])
    assert (s.dtype, s.device, s.kv_cache_memory, s.block_size) == ("auto", "cpu", None, 16)
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len, s.max_waiting) == (
        64,
        2048,
        None,
        1024,
    )
    assert s.max_output_tokens == 16384
    assert (s.enable_prefix_caching, s.dequantize_experts, s.log_requests) == (True, False, False)
    assert (s.seed, s.cache_dir, s.max_body_bytes, s.log_level) == (0, None, 4 * 2**20, "info")
    assert (s.drain_timeout, s.default_reasoning_effort) == (30.0, "medium")
    assert BY_NAME["default_reasoning_effort"].choices == REASONING_EFFORTS
    assert ServerSettings().served_model_name is not ServerSettings().served_model_name  # no shared list


def test_every_setting_has_a_flag_an_env_var_and_a_readme_row():
    parser = build_arg_parser()
    by_dest = {a.dest: a for a in parser._actions}
    env = known_env_vars(parser)
    table = readme_table()
    for s in DECLARED:
        action = by_dest[s.name]
        assert s.flag in action.option_strings
        assert env_var_name(action) == s.env == "GPTOSS_" + s.flag[2:].replace("-", "_").upper()
        assert env[s.env] == s.flag
        assert f"| `{s.flag}`" in table and f"| `{s.env}` |" in table, s.name
        if s.kind == "bool":
            assert f"--no-{s.flag[2:]}" in action.option_strings
    # Nothing else: the parser is the declaration (plus -h).
    assert {a.dest for a in parser._actions} - {"help"} == set(BY_NAME)
    assert len(env) == len(DECLARED)
    assert "--scripted-tokens" not in parser._option_string_actions


def test_flag_names_are_the_deploy_contract():
    names = known_env_vars()
    for flag in (
        "host", "port", "model", "served-model-name", "dtype", "device", "kv-cache-memory", "block-size",
        "max-num-seqs", "max-num-batched-tokens", "max-model-len", "max-output-tokens", "max-waiting",
        "enable-prefix-caching", "dequantize-experts", "seed", "cache-dir", "max-body-bytes", "api-key",
        "log-level", "log-requests", "drain-timeout", "default-reasoning-effort",
    ):  # fmt: skip
        assert "GPTOSS_" + flag.replace("-", "_").upper() in names
    assert BY_NAME["api_keys"].flag == "--api-key" and BY_NAME["served_model_name"].kind == "list"
    assert build_arg_parser().prog == "gptoss-server"


def test_build_arg_parser_parses_to_the_declared_defaults():
    args = vars(build_arg_parser().parse_args([]))
    assert args == {s.name: s.default for s in DECLARED}


# -- the README table -------------------------------------------------------------------------------


def test_readme_table_is_generated_from_the_declaration():
    assert readme_table() == settings_table_markdown(), (
        "README.md's configuration table drifted from server/settings.py: "
        "paste `python -m server.cli --settings-table` between its settings-table markers"
    )


def test_table_rows_show_defaults_as_documented():
    rows = {}
    for line in settings_table_markdown().splitlines()[2:]:
        flag, env, default, what = (c.strip() for c in line.strip("|").split(" | "))
        rows[env.strip("`")] = (flag, default, what)
    assert len(rows) == len(DECLARED)
    assert rows["GPTOSS_MODEL"][1] == "embedded default"
    assert rows["GPTOSS_SERVED_MODEL_NAME"][1] == "folder name"
    assert rows["GPTOSS_KV_CACHE_MEMORY"][1] == "engine's choice"
    assert rows["GPTOSS_MAX_MODEL_LEN"][1] == "model's"
    assert rows["GPTOSS_API_KEY"][1] == "none"
    assert rows["GPTOSS_MAX_BODY_BYTES"][1] == "`4MiB`"
    assert rows["GPTOSS_DRAIN_TIMEOUT"][1] == "`30` seconds"
    assert rows["GPTOSS_ENABLE_PREFIX_CACHING"][1] == "on" and rows["GPTOSS_LOG_REQUESTS"][1] == "off"
    assert rows["GPTOSS_LOG_REQUESTS"][0] == "`--log-requests` / `--no-log-requests`"
    assert "`bfloat16`" in rows["GPTOSS_DTYPE"][2]


def test_settings_table_command():
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "--settings-table"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == settings_table_markdown()


# -- parsing: defaults, env, flags -----------------------------------------------------------------


def test_defaults():
    s = parse_settings([], environ={})
    assert s == ServerSettings()
    assert s.model_names() == [DEFAULT_MODEL_NAME]
    assert s.dtype == "auto"  # bfloat16 on CUDA, float32 (exact) elsewhere


def test_env_vars_and_flags_win():
    env = {
        "GPTOSS_PORT": "9001",
        "GPTOSS_API_KEY": "a, b",
        "GPTOSS_KV_CACHE_MEMORY": "2GiB",
        "GPTOSS_ENABLE_PREFIX_CACHING": "false",
        "GPTOSS_DRAIN_TIMEOUT": "12.5",
        "GPTOSS_SERVED_MODEL_NAME": "x,y",
        "GPTOSS_MODEL": "/models/gpt-oss-20b",
        "GPTOSS_LOG_REQUESTS": "yes",
        "GPTOSS_MAX_OUTPUT_TOKENS": "4096",
    }
    s = parse_settings([], environ=env)
    assert s.port == 9001 and s.api_keys == ["a", "b"] and s.kv_cache_memory == 2 * 2**30
    assert s.enable_prefix_caching is False and s.drain_timeout == 12.5 and s.log_requests is True
    assert s.model_names() == ["x", "y"] and s.max_output_tokens == 4096
    s = parse_settings(
        ["--port", "9002", "--api-key", "c", "--enable-prefix-caching", "--no-log-requests"], environ=env
    )
    assert s.port == 9002 and s.api_keys == ["c"] and s.enable_prefix_caching is True
    assert s.log_requests is False
    assert s.served_model_name == ["x", "y"]  # not given as a flag: the env still holds
    s = parse_settings(["--served-model-name", "p", "--served-model-name", "q"], environ=env)
    assert s.served_model_name == ["p", "q"]  # replaces the env list, never appends to it
    assert parse_settings(["--model", "/m/gpt-oss-120b/"], environ={}).model_names() == ["gpt-oss-120b"]


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"GPTOSS_MAX_NUM_SEQS": "8"}, "max_num_seqs", 8),  # positive int
        ({"GPTOSS_SEED": "-3"}, "seed", -3),  # any int
        ({"GPTOSS_MAX_BODY_BYTES": "512KiB"}, "max_body_bytes", 512 * 1024),  # size
        ({"GPTOSS_KV_CACHE_MEMORY": "1e9"}, "kv_cache_memory", 10**9),
        ({"GPTOSS_DRAIN_TIMEOUT": "0"}, "drain_timeout", 0.0),  # float >= 0
        ({"GPTOSS_DEQUANTIZE_EXPERTS": "on"}, "dequantize_experts", True),  # bool
        ({"GPTOSS_DEQUANTIZE_EXPERTS": "TRUE"}, "dequantize_experts", True),
        ({"GPTOSS_DEQUANTIZE_EXPERTS": "1"}, "dequantize_experts", True),
        ({"GPTOSS_ENABLE_PREFIX_CACHING": "off"}, "enable_prefix_caching", False),
        ({"GPTOSS_ENABLE_PREFIX_CACHING": "No"}, "enable_prefix_caching", False),
        ({"GPTOSS_ENABLE_PREFIX_CACHING": "0"}, "enable_prefix_caching", False),
        ({"GPTOSS_API_KEY": "k1,,k2 ,"}, "api_keys", ["k1", "k2"]),  # list
        ({"GPTOSS_API_KEY": ""}, "api_keys", []),
        ({"GPTOSS_DTYPE": "bfloat16"}, "dtype", "bfloat16"),  # choices
        ({"GPTOSS_LOG_LEVEL": "WARNING"}, "log_level", "warning"),  # choices, case-folded
        ({"GPTOSS_DEFAULT_REASONING_EFFORT": "high"}, "default_reasoning_effort", "high"),
        ({"GPTOSS_CACHE_DIR": "/tmp/c"}, "cache_dir", Path("/tmp/c")),  # path
        ({"GPTOSS_MAX_MODEL_LEN": "4096"}, "max_model_len", 4096),  # optional int
        ({"GPTOSS_HOST": "127.0.0.1"}, "host", "127.0.0.1"),  # str
    ],
)
def test_env_parsing_of_each_kind(env, field, value):
    assert getattr(parse_settings([], environ=env), field) == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPTOSS_MAX_NUM_SEQS": "many"}, "not an integer: 'many'"),
        ({"GPTOSS_MAX_NUM_SEQS": "0"}, "must be a positive integer: 0"),
        ({"GPTOSS_MAX_OUTPUT_TOKENS": "-5"}, "must be a positive integer: -5"),
        ({"GPTOSS_PORT": "80.5"}, "not an integer"),
        ({"GPTOSS_DRAIN_TIMEOUT": "soon"}, "not a number: 'soon'"),
        ({"GPTOSS_DRAIN_TIMEOUT": "-1"}, "must be >= 0: -1"),
        ({"GPTOSS_KV_CACHE_MEMORY": "two gigs"}, "not a size"),
        ({"GPTOSS_KV_CACHE_MEMORY": "5XB"}, "unknown size unit"),
        ({"GPTOSS_LOG_REQUESTS": "maybe"}, "expected one of 1/true/yes/on or 0/false/no/off"),
        ({"GPTOSS_DTYPE": "int3"}, "invalid choice 'int3' (choose from auto, float32, bfloat16)"),
        ({"GPTOSS_DEFAULT_REASONING_EFFORT": "max"}, "choose from low, medium, high"),
        ({"GPTOSS_MAX_BODY_BYTES": "0"}, "size must be positive"),
        ({"GPTOSS_STEP_TARGET": "fast"}, "step target must be 'auto', 'off' or milliseconds > 0"),
        ({"GPTOSS_STEP_TARGET": "-3"}, "step target must be 'auto', 'off' or milliseconds > 0"),
    ],
)
def test_bad_env_value_is_a_clear_error(capsys, env, message):
    err = error_of(capsys, [], env)
    ((name, raw),) = env.items()
    assert f"environment variable {name}={raw!r}" in err and message in err, err


def test_a_bad_env_value_fails_even_when_a_flag_overrides_it(capsys):
    err = error_of(capsys, ["--port", "9000"], {"GPTOSS_PORT": "http"})
    assert "GPTOSS_PORT" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-num-seqs", "0"], "argument --max-num-seqs: must be a positive integer: 0"),
        (["--dtype", "int3"], "argument --dtype: invalid choice"),
        (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: not a size"),
        (["--step-target", "0"], "argument --step-target: step target must be"),
        (["--scripted-tokens", "x.json"], "unrecognized arguments: --scripted-tokens"),
    ],
)
def test_bad_flag_is_a_usage_error(capsys, argv, message):
    assert message in error_of(capsys, argv, {})


def test_flags_of_each_kind():
    s = parse_settings(
        [
            "--max-output-tokens", "100", "--max-body-bytes", "1MiB", "--dequantize-experts",
            "--no-enable-prefix-caching", "--api-key", "a,b", "--log-level", "DEBUG", "--drain-timeout", "2.5",
            "--cache-dir", "/c", "--dtype", "float32", "--seed", "7",
        ],
        environ={},
    )  # fmt: skip
    assert (s.max_output_tokens, s.max_body_bytes, s.dequantize_experts) == (100, 2**20, True)
    assert s.enable_prefix_caching is False and s.api_keys == ["a,b"]  # a flag's value is not split
    assert (s.log_level, s.drain_timeout, s.cache_dir, s.dtype, s.seed) == (
        "debug",
        2.5,
        Path("/c"),
        "float32",
        7,
    )


def test_every_env_var_is_read():
    """One value per setting through its env var, then through its flag: each lands on its field."""
    samples = {
        "int": ("3", 3),
        "float": ("1.5", 1.5),
        "bytes": ("1KiB", 1024),
        "bool": ("true", True),
        "list": ("u,v", ["u", "v"]),
        "Path": ("/p", Path("/p")),
        "ResponseStoreSpec": ("redis://h:6379/0", "redis://h:6379/0"),  # validated: memory or a URL
        "StepTarget": ("40", "40"),  # validated: auto, off or milliseconds
    }
    for s in DECLARED:
        if s.choices is not None:
            raw, value = s.choices[-1], s.choices[-1]
        elif s.unit == "bytes":
            raw, value = samples["bytes"]
        elif s.kind in ("bool", "list"):
            raw, value = samples[s.kind]
        else:
            raw, value = samples.get(s.type.__name__, ("text", "text"))
        assert getattr(parse_settings([], environ={s.env: raw}), s.name) == value, s.name
        argv = [s.flag] if s.kind == "bool" else [s.flag, raw]
        flag_value = [raw] if s.kind == "list" else value  # a repeatable flag takes one item each time
        assert getattr(parse_settings(argv, environ={}), s.name) == flag_value, s.name


def test_unrelated_env_vars_are_ignored():
    assert parse_settings([], environ={"GPTOSS_NOT_A_SETTING": "x", "PORT": "1"}) == ServerSettings()


# -- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1e9", 10**9), ("3 GB", 3 * 10**9), ("100", 100)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_garbage():
    for text in ("", "two gigs", "5XB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(text)


def test_format_bytes_round_trips():
    for n in (4 * 2**20, 2**30, 1000, 1536, 7):
        assert parse_bytes(format_bytes(n)) == n
    assert (format_bytes(4 * 2**20), format_bytes(3 * 2**10), format_bytes(1536)) == ("4MiB", "3KiB", "1536")


# -- the engine's config ---------------------------------------------------------------------------


def test_engine_settings_pass_through_by_name():
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    marked = {s.name for s in DECLARED if s.engine}
    assert marked <= engine_fields  # every engine setting is an EngineConfig field
    assert {"dtype", "device", "kv_cache_memory", "max_num_seqs", "max_model_len", "seed"} <= marked
    assert "max_output_tokens" not in marked and "api_keys" not in marked  # server-side settings
    settings = parse_settings(
        [
            "--block-size",
            "32",
            "--max-num-seqs",
            "3",
            "--kv-cache-memory",
            "1GiB",
            "--no-enable-prefix-caching",
        ],
        environ={"GPTOSS_SEED": "5", "GPTOSS_MAX_MODEL_LEN": "512", "GPTOSS_DEQUANTIZE_EXPERTS": "1"},
    )
    config = engine_config(settings, "/models/x")
    assert config.model_dir == "/models/x"
    for name in marked - {"dtype"}:
        assert getattr(config, name) == getattr(settings, name), name
    assert config.dtype == "float32"  # auto on the CPU
    assert engine_config(dataclasses.replace(settings, device="cuda:1"), "/m").dtype == "bfloat16"
    assert engine_config(dataclasses.replace(settings, dtype="bfloat16"), "/m").dtype == "bfloat16"
    assert engine_config(settings, "/m", max_waiting=7).max_waiting == 7  # overrides


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "mps") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16" and resolve_dtype("float32", "cuda") == "float32"
    with pytest.raises(ValueError, match="int3"):
        resolve_dtype("int3", "cpu")
    assert EngineConfig(model_dir="/m", dtype="auto").dtype == "float32"
    assert EngineConfig(model_dir="/m", dtype="auto", device="cuda").dtype == "bfloat16"
    with pytest.raises(ValueError):
        EngineConfig(model_dir="/m", dtype="float16")


def test_env_var_name_of_actions():
    parser = argparse.ArgumentParser()
    assert env_var_name(parser.add_argument("--some-flag")) == "GPTOSS_SOME_FLAG"
    assert env_var_name(parser.add_argument("--x", action=argparse.BooleanOptionalAction)) == "GPTOSS_X"
    assert env_var_name(parser.add_argument("positional")) is None
