"""The server's configuration, declared once.

Each field of ``ServerSettings`` carries its whole declaration (``setting(...)``): default,
help, unit, choices, bounds, the README's "Default" text and whether it is an engine setting.
From it come the flags and ``GPTOSS_*`` env vars (``server.cli``), the README's configuration
table (``settings_table_markdown``) and the engine's config (``engine_config``).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harmony.conversation import REASONING_EFFORTS
from server.setting_values import (
    ResponseStoreSpec,
    SecretText,
    StepTarget,
    format_bytes,
)

if TYPE_CHECKING:
    from engine.config import EngineConfig

# The embedded default model's public name (README examples use it).
DEFAULT_MODEL_NAME = "gpt-oss-tiny"
ENV_PREFIX = "GPTOSS_"

# unit -> argparse metavar. "bytes" also means the value is read by parse_bytes (2GiB, 512MB,
# 1e9); the other units follow a literal default in the README ("`16` tokens").
UNITS: dict[str, str] = {"bytes": "SIZE", "seconds": "SECONDS", "tokens": "TOKENS"}


def setting(
    default: Any,
    help: str,
    *,
    unit: str | None = None,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    lower: bool = False,
    flag: str | None = None,
    shown: str | None = None,
    engine: bool = False,
) -> Any:
    """One setting's declaration, as a dataclass field.

    ``help``: markdown (README) and, without backticks, the ``--help`` text. ``unit``: a key of
    ``UNITS``. ``minimum``: the smallest accepted number. ``lower``: values are lowercased
    before the choices check. ``flag``: the long option when it is not ``--`` + the field name
    with dashes. ``shown``: the README's "Default" text where the default is not a literal
    (``embedded default``, ``none``...). ``engine``: passed to ``EngineConfig`` by name.
    """
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r} (known: {', '.join(UNITS)})")
    metadata = {
        "help": help,
        "unit": unit,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "lower": lower,
        "flag": flag,
        "shown": shown,
        "engine": engine,
    }
    if isinstance(default, list):
        items = tuple(default)
        return field(default_factory=lambda: list(items), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    # setting(default, help, ...): see its docstring. Field order = README table order.
    # (RUF009: setting() returns a dataclasses.field, like field() itself.)
    host: str = setting("0.0.0.0", "bind address")
    port: int = setting(8000, "TCP port")
    model: str | None = setting(
        None,
        "checkpoint folder (HF or original layout); none = the embedded demonstration model gpt-oss-tiny (docs/demo-model.md)",
        shown="embedded default",
    )
    served_model_name: list[str] = setting(  # noqa: RUF009
        [], "name(s) accepted as `model` (repeatable)", shown="folder name"
    )
    dtype: str = setting(
        "auto",
        "weights, activations and KV cache; `auto` = bfloat16 on CUDA, float32 (exact) elsewhere",
        choices=("auto", "float32", "bfloat16"),
        engine=True,
    )
    device: str = setting("cpu", "torch device (`cuda`, `cuda:1`, ...)", engine=True)
    kv_cache_memory: int | None = setting(
        None, "KV cache budget", unit="bytes", shown="engine's choice", engine=True
    )
    block_size: int = setting(16, "KV block size", unit="tokens", minimum=1, engine=True)
    max_num_seqs: int = setting(64, "sequences running at once", minimum=1, engine=True)
    max_num_batched_tokens: int = setting(
        2048, "budget of one forward pass (decodes + prefill chunks)", unit="tokens", minimum=1, engine=True
    )
    step_target: StepTarget = setting(  # noqa: RUF009
        StepTarget("auto"),
        "while requests are decoding, a step's prefill tokens are bounded so the step takes about "
        "this long, which bounds the inter-token stall a long prompt causes: `auto` = twice the "
        "time of the step's decode tokens alone (learned from the steps run), a number of "
        "milliseconds, or `off` (only `--max-num-batched-tokens`). With nothing decoding, prefill "
        "always runs at full size, and `auto` also runs it at full size while at least twice as "
        "many requests wait for prefill as decode (a burst being admitted)",
        engine=True,
    )
    max_model_len: int | None = setting(
        None, "context length cap in tokens", unit="tokens", minimum=1, shown="model's", engine=True
    )
    max_output_tokens: int = setting(
        16384,
        "output limit of a request that sets no `max_tokens`/`max_completion_tokens` (it gets "
        "the smaller of this and the context left after its prompt)",
        unit="tokens",
        minimum=1,
    )
    max_waiting: int = setting(1024, "waiting-queue bound; beyond it 429", minimum=1, engine=True)
    enable_prefix_caching: bool = setting(True, "reuse KV of shared prompt prefixes", engine=True)
    dequantize_experts: bool = setting(
        False, "unpack MXFP4 experts at load (more memory, faster on CPU)", engine=True
    )
    kernels: str = setting(
        "auto",
        "compute kernels: `auto` = `native-cpu` (packed MXFP4 experts) on a CPU where it builds and "
        "passes its startup self-check against `reference` (a CPU path that fails it, such as AMX, "
        "gives way to the next one down, with a warning in the log), else `reference` (PyTorch, any "
        "device); "
        "a name forces that backend (startup fails if it cannot run here)",
        choices=("auto", "reference", "native-cpu"),
        lower=True,
        engine=True,
    )
    seed: int = setting(0, "seed of requests without their own", engine=True)
    cache_dir: Path | None = setting(  # noqa: RUF009
        None, "where the embedded default model is generated", shown="`~/.cache/gptoss-server`"
    )
    max_body_bytes: int = setting(4 * 1024 * 1024, "request body limit; beyond it 413", unit="bytes")
    api_keys: list[str] = setting(  # noqa: RUF009
        [],
        "accepted bearer keys (repeatable / comma-separated); none = no auth",
        flag="--api-key",
        shown="none",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"), lower=True)
    log_requests: bool = setting(False, "log prompt and completion text (never logged otherwise)")
    drain_timeout: float = setting(
        30.0, "time in-flight requests get after SIGTERM", unit="seconds", minimum=0
    )
    default_reasoning_effort: str = setting(
        "medium", "effort when a request sets none", choices=REASONING_EFFORTS
    )
    response_store: ResponseStoreSpec = setting(  # noqa: RUF009
        "memory",
        "where `/v1/responses` keeps stored responses: `memory` (this process only) or "
        "`redis://HOST:PORT/DB` (`rediss://` for TLS), shared by every replica pointing at it; "
        "more than one replica needs Redis",
    )
    response_store_max_bytes: int = setting(
        2**30,
        "cap on the stored responses' total size (keys + records); the least recently used go first",
        unit="bytes",
    )
    response_store_ttl: float = setting(
        86400.0,
        "a stored response is forgotten this long after it was stored (one day)",
        unit="seconds",
        minimum=1,
    )
    reasoning_encryption_key: SecretText | None = setting(  # noqa: RUF009
        None,
        "secret that seals `reasoning.encrypted_content` (`store: false` clients); unset = a random key "
        "per process, so replicas behind one load balancer must share it (set it as the secret env var "
        "`GPTOSS_REASONING_ENCRYPTION_KEY`)",
        shown="random per process",
    )

    def model_names(self) -> list[str]:
        if self.served_model_name:
            return list(self.served_model_name)
        if self.model is None:
            return [DEFAULT_MODEL_NAME]
        return [Path(self.model).resolve().name or "gpt-oss"]


Kind = Literal["value", "bool", "list"]


@dataclass(frozen=True)
class Setting:
    """One field of ``ServerSettings`` with its declaration, as ``server.cli`` and the README
    table read it."""

    name: str  # the ServerSettings field
    flag: str  # "--max-num-seqs"
    env: str  # "GPTOSS_MAX_NUM_SEQS"
    kind: Kind  # "bool": --x/--no-x; "list": repeatable flag, comma-separated env; else one value
    type: type  # of one value: int, float, str, Path (bool for "bool")
    optional: bool  # None is a valid value (the default)
    default: Any
    help: str  # markdown
    unit: str | None
    choices: tuple[str, ...] | None
    minimum: float | None
    lower: bool
    shown: str | None
    engine: bool

    @property
    def default_text(self) -> str:
        """The README's "Default" column."""
        if self.shown is not None:
            return self.shown
        if self.kind == "bool":
            return "on" if self.default else "off"
        if self.unit == "bytes":
            return f"`{format_bytes(self.default)}`"
        value = self.default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return f"`{value}`" + (f" {self.unit}" if self.unit else "")

    @property
    def what(self) -> str:
        """The README's "What" column: the help, how sizes are written, the choices."""
        text = self.help
        if self.unit == "bytes":
            text += " (e.g. `2GiB`, `512MB`, `1e9`)"
        if self.choices is not None:
            text += "; one of " + ", ".join(f"`{c}`" for c in self.choices)
        return text

    @property
    def flags_text(self) -> str:
        """The README's "Flag" column."""
        if self.kind == "bool":
            return f"`{self.flag}` / `--no-{self.flag[2:]}`"
        return f"`{self.flag}`"


def flag_env_name(flag: str) -> str:
    """``--max-num-seqs`` -> ``GPTOSS_MAX_NUM_SEQS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _describe(f: Any, hint: Any) -> Setting:
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"ServerSettings.{f.name} is not declared with setting(...)")
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
    if hint is bool:
        kind: Kind = "bool"
        value_type: type = bool
    elif typing.get_origin(hint) is list:
        kind, (value_type,) = "list", typing.get_args(hint)
    else:
        kind, value_type = "value", hint
    default = f.default_factory() if f.default is MISSING else f.default
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    return Setting(
        name=f.name,
        flag=flag,
        env=flag_env_name(flag),
        kind=kind,
        type=value_type,
        optional=optional,
        default=default,
        help=meta["help"],
        unit=meta["unit"],
        choices=meta["choices"],
        minimum=meta["minimum"],
        lower=meta["lower"],
        shown=meta["shown"],
        engine=meta["engine"],
    )


@functools.cache
def settings_declaration() -> tuple[Setting, ...]:
    """Every setting, in ``ServerSettings`` field order."""
    hints = typing.get_type_hints(ServerSettings)
    return tuple(_describe(f, hints[f.name]) for f in fields(ServerSettings))


def settings_table_markdown() -> str:
    """The README's configuration table (between its ``settings-table`` markers)."""
    lines = ["| Flag | Env | Default | What |", "|---|---|---|---|"]
    for s in settings_declaration():
        lines.append(f"| {s.flags_text} | `{s.env}` | {s.default_text} | {s.what} |")
    return "\n".join(lines) + "\n"


def engine_config(settings: ServerSettings, model_dir: str, **overrides: Any) -> EngineConfig:
    """The engine's config: every setting declared ``engine=True`` passes through by name
    (``dtype="auto"`` is resolved by ``EngineConfig``); ``overrides`` (``EngineConfig``
    fields) win over them."""
    from engine.config import EngineConfig

    values = {s.name: getattr(settings, s.name) for s in settings_declaration() if s.engine}
    return EngineConfig(**{"model_dir": model_dir, **values, **overrides})
