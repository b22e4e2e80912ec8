"""Command line and environment: every flag ``--some-flag`` also reads ``GPTOSS_SOME_FLAG``.

Flags win over the environment. ``--api-key`` and ``--served-model-name`` may repeat; their
env vars hold comma-separated lists. Booleans read ``1/true/yes/on`` and ``0/false/no/off``.
The flag names are a contract with deploy/ (Dockerfile, compose, Kubernetes): keep them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.settings import REASONING_EFFORTS, ServerSettings, parse_bytes

ENV_PREFIX = "GPTOSS_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_arg_parser() -> argparse.ArgumentParser:
    d = ServerSettings()
    p = argparse.ArgumentParser(
        prog="gptoss-server",
        description="OpenAI-compatible server for gpt-oss models. Every flag also reads the env var "
        "GPTOSS_<FLAG_IN_UPPER_SNAKE_CASE> (flags win).",
    )
    p.add_argument("--host", default=d.host, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port (default %(default)s)")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint folder (HF or original layout); omitted = an embedded random-weight tiny model",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="name(s) clients use in `model` (repeatable; default: the model folder's name)",
    )
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument(
        "--kv-cache-memory", type=_size, default=None, help="KV cache budget, e.g. 2GiB (default: engine's)"
    )
    p.add_argument("--block-size", type=_positive_int, default=d.block_size, help="KV block size in tokens")
    p.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs, help="max running requests")
    p.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=d.max_num_batched_tokens,
        help="tokens per step",
    )
    p.add_argument(
        "--max-model-len", type=_positive_int, default=None, help="context length cap (default: the model's)"
    )
    p.add_argument(
        "--max-waiting", type=_positive_int, default=d.max_waiting, help="waiting-queue bound; beyond it 429"
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse KV blocks of shared prompt prefixes",
    )
    p.add_argument(
        "--dequantize-experts",
        action=argparse.BooleanOptionalAction,
        default=d.dequantize_experts,
        help="unpack MXFP4 experts at load time (more memory, faster on CPU)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="engine seed")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the embedded default model is generated (default ~/.cache/gptoss-server)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_size,
        default=d.max_body_bytes,
        help="request body limit (default 4MiB); 413",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted bearer key (repeatable; env: comma-separated). None = no auth",
    )
    p.add_argument(
        "--log-level", default=d.log_level, type=str.lower, choices=["debug", "info", "warning", "error"]
    )
    p.add_argument(
        "--log-requests",
        action=argparse.BooleanOptionalAction,
        default=d.log_requests,
        help="log prompt and completion text (off by default)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=d.drain_timeout,
        help="seconds in-flight requests may run after SIGTERM before they are aborted",
    )
    p.add_argument(
        "--default-reasoning-effort",
        default=d.default_reasoning_effort,
        choices=list(REASONING_EFFORTS),
        help="used when a request sets none",
    )
    # Test-only: scripted outputs instead of sampled ones (the model still runs).
    p.add_argument("--scripted-tokens", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def env_var_name(action: argparse.Action) -> str | None:
    longs = [s for s in action.option_strings if s.startswith("--") and not s.startswith("--no-")]
    if not longs:
        return None
    return ENV_PREFIX + longs[0][2:].replace("-", "_").upper()


def known_env_vars(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Every env var the server reads, mapped to its flag (for deploy-file checks)."""
    parser = parser or build_arg_parser()
    out = {}
    for action in parser._actions:
        name = env_var_name(action)
        if name and action.dest != "help":
            out[name] = action.option_strings[0]
    return out


def _env_value(parser: argparse.ArgumentParser, action: argparse.Action, name: str, raw: str):
    try:
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true/false")
        if isinstance(action, argparse._AppendAction):
            items = [x.strip() for x in raw.split(",") if x.strip()]
            return [action.type(x) if action.type else x for x in items]
        value = action.type(raw) if action.type else raw
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
        return value
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"environment variable {name}={raw!r}: {exc}")


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    environ = os.environ if environ is None else environ
    parser = build_arg_parser()
    env_defaults = {}
    for action in parser._actions:
        name = env_var_name(action)
        if name and name in environ:
            env_defaults[action.dest] = _env_value(parser, action, name, environ[name])
    # Append actions would add flag values to an env-provided list; flags must replace it.
    append_dests = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    parser.set_defaults(**{k: v for k, v in env_defaults.items() if k not in append_dests})
    args = parser.parse_args(argv)
    for dest in append_dests:
        if getattr(args, dest) is None:
            setattr(args, dest, env_defaults.get(dest, []))
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=list(args.served_model_name),
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        enable_prefix_caching=args.enable_prefix_caching,
        dequantize_experts=args.dequantize_experts,
        seed=args.seed,
        cache_dir=args.cache_dir,
        max_body_bytes=args.max_body_bytes,
        api_keys=[k for k in args.api_key if k],
        log_level=args.log_level,
        log_requests=args.log_requests,
        drain_timeout=args.drain_timeout,
        default_reasoning_effort=args.default_reasoning_effort,
        scripted_tokens=args.scripted_tokens,
    )
