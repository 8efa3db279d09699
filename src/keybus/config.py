"""One configuration from a file and the environment: ``keybus.connect_from_config``.

A source is a path (``.toml``, ``.yaml``/``.yml``, ``.json``) or a mapping; environment
variables ``KEYBUS_<KEY>`` override it, nested keys joined by ``__``
(``KEYBUS_TLS__CA_FILE``, ``KEYBUS_TOPIC_CONFIG__PARTITIONS``); their values are read
as JSON where they parse as JSON (``3``, ``true``, ``{"linger.ms": 5}``), else as text.
The result is validated by msgspec (already keybus's codec) into :class:`Config`, whose
:meth:`Config.connect_options` are exactly what ``keybus.connect(url, **options)`` takes
— the file path builds the same options as a call. A bad value raises
:class:`~keybus.errors.ConfigError` naming the key, the value (masked when it is a
secret) and what was expected.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from keybus.errors import ConfigError
from keybus.options import SubscribeOptions
from keybus.security import SASL, TLS, Secret
from keybus.topics import TopicConfig

__all__ = ["Config", "load_config"]

_ENV_PREFIX = "KEYBUS_"
_SECRET_KEYS = frozenset({"password", "token", "nkey_seed", "key_password", "sasl_password"})
_MASK = "**********"


class TLSConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None
    verify: bool = True
    server_hostname: str | None = None


class SASLConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mechanism: str
    username: str | None = None
    password: str | None = None


class TopicConfigModel(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    partitions: int = 3
    replication_factor: int = 1
    retention_seconds: float | None = None
    compression: str | None = None
    ephemeral: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a configuration holds. ``options`` is backend tuning passed through to the
    transport as it is (``producer_config``, ``consumer_config``, ``commit_interval``,
    ``lease_ttl``, ...); ``subscribe`` holds defaults for every subscription's options."""

    url: str
    group: str | None = None
    connect_timeout: float | None = None
    create_topics: bool | None = None
    topic_config: TopicConfigModel | None = None
    subscribe: dict[str, Any] | None = None
    tls: bool | TLSConfig | None = None
    sasl: SASLConfig | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: str | None = None
    credentials: str | None = None
    metrics: bool | None = None
    tracing: bool | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)

    def connect_options(self) -> dict[str, Any]:
        """The keyword options of ``keybus.connect`` (``url`` and ``group`` apart)."""
        out: dict[str, Any] = dict(self.options)
        for name in ("connect_timeout", "create_topics", "user", "credentials"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("password", "token", "nkey_seed"):
            value = getattr(self, name)
            if value is not None:
                out[name] = Secret(value)
        for name in ("metrics", "tracing"):
            if getattr(self, name):
                out[name] = True
        if self.topic_config is not None:
            out["topic_config"] = TopicConfig(**msgspec.structs.asdict(self.topic_config))
        if isinstance(self.tls, TLSConfig):
            fields = msgspec.structs.asdict(self.tls)
            fields["key_password"] = Secret.of(fields["key_password"])
            out["tls"] = TLS(**fields)
        elif self.tls:
            out["tls"] = True
        if self.sasl is not None:
            out["sasl"] = SASL(
                self.sasl.mechanism,  # type: ignore[arg-type]  # checked by SASL
                username=self.sasl.username,
                password=Secret.of(self.sasl.password),
            )
        if self.subscribe:
            out["subscribe_defaults"] = dict(self.subscribe)
        return out


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read ``source`` (a file path or a mapping), apply ``KEYBUS_*`` overrides from
    ``environ`` (default: the process environment) and validate. Errors:
    :class:`ConfigError` (naming the key)."""
    raw = _read(source) if not isinstance(source, Mapping) else dict(source)
    merged = _overlay(raw, _from_env(os.environ if environ is None else environ))
    try:
        config = msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, merged) from None
    try:
        # Everything the options will be built from is checked now, not at connect.
        options = config.connect_options()
        SubscribeOptions(**options.get("subscribe_defaults", {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError("", "", f"{exc}") from None
    return config


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise ConfigError("", "", f"cannot read {file}: {exc.strerror}") from None
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text.decode())
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    "", "", "a YAML configuration needs PyYAML: pip install pyyaml"
                ) from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError("", "", f"{file}: use a .toml, .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # the parser's own error names the line
        raise ConfigError("", "", f"{file} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", "", f"{file} must hold a table/mapping at the top")
    return data


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(_ENV_PREFIX) or name == _ENV_PREFIX:
            continue
        path = [part.lower() for part in name[len(_ENV_PREFIX) :].split("__")]
        if path[0] not in Config.__struct_fields__:
            continue  # KEYBUS_BACKENDS and friends belong to others
        value: Any
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = value
    return out


def _explain(exc: msgspec.ValidationError, data: Mapping[str, Any]) -> ConfigError:
    """msgspec says ``Expected `int`, got `str` - at `$.topic_config.partitions```: name
    the key, show the value (masked for a secret) and what was expected."""
    text = str(exc)
    reason, _, where = text.partition(" - at `$")
    key = where.rstrip("`").lstrip(".")
    value: Any = data
    for part in key.split(".") if key else ():
        value = value.get(part) if isinstance(value, Mapping) else None
    shown = _MASK if key.rsplit(".", 1)[-1] in _SECRET_KEYS else repr(value)
    if "unknown field" in reason.lower():
        return ConfigError(key, "", reason)
    return ConfigError(key or "(top)", shown if key else "", reason)
