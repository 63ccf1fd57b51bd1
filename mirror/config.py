"""Configuration: embedded defaults < TOML file < MIRROR_* environment < command-line flags.

Everything is validated at start so a typo is refused with the file, the key and
the reason, instead of surfacing as a strange failure on the first pull.
"""
from __future__ import annotations

import math
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

EXIT_CONFIG = 2  # the exit status of a command refused for its settings or its data directory

DEFAULT_UPSTREAMS = {
    "docker.io": "https://registry-1.docker.io",
    "ghcr.io": "https://ghcr.io",
    "quay.io": "https://quay.io",
    "registry.k8s.io": "https://registry.k8s.io",
    "gcr.io": "https://gcr.io",
    "public.ecr.aws": "https://public.ecr.aws",
    "mcr.microsoft.com": "https://mcr.microsoft.com",
}
# Registries whose token realm lives on a host of their own: the default `token_realms` of an
# upstream at that host (a file can list others, or none).
KNOWN_TOKEN_REALMS = {"registry-1.docker.io": ("auth.docker.io",)}


class ConfigError(Exception):
    """A refused setting: where it came from, which key, and why."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source, self.key, self.reason = source, key, reason


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    tag_ttl: float = 600.0
    negative_ttl: float = 30.0  # how long an upstream 404 for a tag is believed
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    # how long a request waits for upstream to revalidate what the cache holds (an expired tag, an
    # expired access decision) before the cached answer goes out; the revalidation goes on
    revalidate_timeout: float = 3.0
    access_ttl: float = 600.0
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    share_with_anonymous: bool = False
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    # hosts (`host` or `host:port`) besides the upstream's own whose token realm may receive credentials
    token_realms: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.token_realms is None:
            host = (urlsplit(self.url).hostname or "").lower()
            object.__setattr__(self, "token_realms", KNOWN_TOKEN_REALMS.get(host, ()))


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:5000"
    data_dir: str = "./mirror-data"
    default_upstream: str = "docker.io"
    log_level: str = "info"
    log_format: str = "plain"
    shutdown_timeout: float = 30.0
    tls_cert: str = ""
    tls_key: str = ""
    public_url: str = ""
    admin_token: str = ""  # opens /admin/ over TCP to callers that send it as a bearer token
    workers: int = field(default_factory=lambda: parse_workers("auto"))  # processes sharing the port


@dataclass(frozen=True)
class CacheConfig:
    max_size: str = "80%"


@dataclass(frozen=True)
class S3Config:
    """Where a fleet's shared content lives: a bucket of an S3-compatible store (see mirror.storage.bucket)."""

    bucket: str = ""
    endpoint_url: str = ""  # empty: AWS's endpoint for `region`
    region: str = "us-east-1"
    prefix: str = ""  # keys start with it ("" or ending in "/")
    addressing_style: str = "path"  # "path" (MinIO, Ceph, most gateways) or "virtual" or "auto"
    access_key_id: str | None = None  # neither key set: botocore's chain (AWS_* variables, profile, role)
    secret_access_key: str | None = None
    access_key_id_file: str | None = None
    secret_access_key_file: str | None = None
    redirect: bool = False  # send clients a presigned URL of a stored blob instead of its bytes
    redirect_ttl: float = 1200.0  # how long such a URL works (distribution's default, 20 minutes)
    max_size: str = ""  # evict the bucket's least recently used content beyond this (empty: never)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "filesystem"  # or "s3": content shared in a bucket, the data directory its local copy
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(
        default_factory=lambda: {n: UpstreamConfig(n, u) for n, u in DEFAULT_UPSTREAMS.items()}
    )

    @property
    def host_port(self) -> tuple[str, int]:
        return split_listen(self.server.listen)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("plain", "json")
_BACKENDS = ("filesystem", "s3")
_ADDRESSING_STYLES = ("path", "virtual", "auto")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules, in short


def parse_duration(value: object) -> float:
    """`"10m"`, `"30s"`, `"500ms"`, `"1h"`, `"7d"` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION_RE.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"expected a duration like 30s, 10m, 1h or 7d, got {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_size(value: str) -> tuple[int | None, float | None]:
    """`"200GiB"` → (bytes, None); `"80%"` → (None, 0.8)."""
    text = str(value).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = -1
        if not 0 < pct <= 100:
            raise ValueError(f"expected a percentage between 0 and 100, got {value!r}")
        return None, pct / 100
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"expected a size like 200GiB, 500MB or 80%, got {value!r}")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power), None


MAX_WORKERS = 64
AUTO_WORKERS_MAX = 8  # secondaries serve hits; beyond this the primary's share of the work dominates


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, lowered by a cgroup v2 CPU quota (a container's limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cpus


def parse_workers(value: object) -> int:
    """`"auto"` (one per usable CPU, at most AUTO_WORKERS_MAX) or a count from 1 to MAX_WORKERS."""
    if value == "auto":
        return min(usable_cpus(), AUTO_WORKERS_MAX)
    count = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or not 1 <= count <= MAX_WORKERS:
        raise ValueError(f'expected "auto" or a number of processes from 1 to {MAX_WORKERS}, got {value!r}')
    return count


def parse_token_realms(value: object) -> tuple[str, ...]:
    """A list of `host` or `host:port` (IPv6 in brackets), lower-cased; ValueError otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'expected a list of hosts, like ["auth.docker.io"], got {value!r}')
    realms = []
    for entry in value:
        parts = urlsplit("//" + entry.strip())
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (not parts.hostname or port == -1 or port == 0 or parts.path or parts.query or parts.fragment
                or "@" in parts.netloc or "#" in entry or "?" in entry):
            raise ValueError(f"{entry!r} is not a host or host:port (no scheme, path or userinfo), "
                             f"like auth.docker.io or auth.example.com:8443")
        realms.append(parts.netloc.lower())
    return tuple(realms)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_url(url: object) -> str:
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return str(url).rstrip("/")


def _check_readable(path: object) -> None:
    if not isinstance(path, str):
        raise ValueError(f"expected a file path, got {type(path).__name__} {path!r}")
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable by this user")


def _check_tls(server: ServerConfig) -> str | None:
    """Why the TLS settings cannot serve HTTPS, or None when they can (or are not set)."""
    if not server.tls_cert and not server.tls_key:
        return None
    if not (server.tls_cert and server.tls_key):
        return "tls_cert and tls_key must be set together"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(server.tls_cert, server.tls_key)
    except (ssl.SSLError, OSError) as exc:
        return f"cannot load the certificate {server.tls_cert} with the key {server.tls_key}: {exc}"
    return None


def ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server-side TLS context for `server.tls_cert`/`tls_key`, or None for plain HTTP."""
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.tls_cert, server.tls_key)
    return context


def _build(cls: type, raw: Mapping[str, Any], source: str, section: str, **extra: Any) -> Any:
    """Build a section dataclass from raw values, refusing unknown keys and bad values."""
    known = {f.name: f for f in fields(cls)} 
    values: dict[str, Any] = dict(extra)
    for key, value in raw.items():
        where = f"{section}.{key}"
        if key not in known or key in extra:
            raise ConfigError(source, where, f"unknown key (known: {', '.join(k for k in known if k not in extra)})")
        try:
            values[key] = _convert(key, value)
        except ValueError as exc:
            raise ConfigError(source, where, str(exc)) from None
        if known[key].type in ("str", "str | None") and not isinstance(values[key], str):
            raise ConfigError(source, where, f"expected a string, got {type(value).__name__} {value!r}")
        if known[key].type == "bool":
            values[key] = _boolean(value, source, where)
    return cls(**values)


def _boolean(value: Any, source: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(source, where, f"expected true or false, got {value!r}")


def _upstream(table: Mapping[str, Any], source: str, name: str) -> UpstreamConfig:
    """An upstream's settings, with its secret read from `password_file` and files checked now."""
    where = f"upstreams.{name}"
    if "url" not in table:
        raise ConfigError(source, f"{where}.url", 'missing (e.g. url = "https://ghcr.io")')
    up: UpstreamConfig = _build(UpstreamConfig, table, source, where, name=name)
    if up.password is not None and up.password_file is not None:
        raise ConfigError(source, f"{where}.password_file", "set password or password_file, not both")
    if up.password_file is not None:
        try:
            up = replace(up, password=Path(up.password_file).read_text().strip())
        except OSError as exc:
            raise ConfigError(source, f"{where}.password_file", f"cannot read {up.password_file}: {exc.strerror}") from None
    if (up.username is None) != (up.password is None):
        raise ConfigError(source, f"{where}.username", "a service account needs both username and password")
    if up.revalidate_timeout <= 0:
        # zero would serve every expired tag stale, never waiting for upstream's answer
        raise ConfigError(source, f"{where}.revalidate_timeout", "expected a duration above zero, like 3s or 500ms")
    if up.ca_file is not None and not os.access(up.ca_file, os.R_OK):
        raise ConfigError(source, f"{where}.ca_file", f"cannot read {up.ca_file}")
    return up


def _storage(raw: Mapping[str, Any], source: str) -> StorageConfig:
    """The storage section, with the s3 table's keys read from their files and checked together."""
    table = dict(raw)
    s3_raw = table.pop("s3", {})
    if not isinstance(s3_raw, dict):
        raise ConfigError(source, "storage.s3", "expected a table")
    storage: StorageConfig = _build(StorageConfig, table, source, "storage", s3=S3Config())
    s3: S3Config = _build(S3Config, s3_raw, source, "storage.s3")
    for name in ("access_key_id", "secret_access_key"):
        key_file = getattr(s3, f"{name}_file")
        if key_file is None:
            continue
        if getattr(s3, name) is not None:
            raise ConfigError(source, f"storage.s3.{name}_file", f"set {name} or {name}_file, not both")
        try:
            s3 = replace(s3, **{name: Path(key_file).read_text().strip()})
        except OSError as exc:
            raise ConfigError(source, f"storage.s3.{name}_file", f"cannot read {key_file}: {exc.strerror}") from None
    # keys hold no whitespace: a newline from `echo` into a secret store is not part of one
    s3 = replace(s3, **{k: v.strip() for k in ("access_key_id", "secret_access_key") if (v := getattr(s3, k)) is not None})
    if (s3.access_key_id is None) != (s3.secret_access_key is None):
        raise ConfigError(source, "storage.s3.access_key_id", "set both keys (or neither, for the AWS_* variables)")
    if s3.max_size and parse_size(s3.max_size)[0] is None:
        raise ConfigError(source, "storage.s3.max_size", f"expected a size like 2TiB (a bucket has no disk to take a share of), got {s3.max_size!r}")
    if storage.backend == "s3" and not s3.bucket:
        raise ConfigError(source, "storage.s3.bucket", 'missing: backend "s3" needs a bucket (e.g. bucket = "mirror")')
    return replace(storage, s3=s3)


def _convert(key: str, value: Any) -> Any:
    if key.endswith("ttl") or key.endswith("timeout"):
        return parse_duration(value)
    if key == "url":
        return _check_url(value)
    if key == "listen":
        split_listen(str(value))
    if key == "max_size":
        parse_size(str(value))
        return str(value)
    if key == "backend" and value not in _BACKENDS:
        raise ValueError(f"expected one of {', '.join(_BACKENDS)}, got {value!r}")
    if key == "addressing_style" and value not in _ADDRESSING_STYLES:
        raise ValueError(f"expected one of {', '.join(_ADDRESSING_STYLES)}, got {value!r}")
    if key == "bucket" and not (isinstance(value, str) and _BUCKET_RE.fullmatch(value)):
        raise ValueError(f"expected a bucket name (3 to 63 of a-z, 0-9, '.', '-'), got {value!r}")
    if key == "prefix" and not (isinstance(value, str) and (value == "" or (value.endswith("/") and not value.startswith("/")))):
        raise ValueError(f'expected "" or a key prefix ending in "/" (and not starting with one), like "mirror/", got {value!r}')
    if key == "endpoint_url" and value != "":
        return _check_url(value)
    if key == "log_level" and str(value).lower() not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    if key == "log_format" and value not in _LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(_LOG_FORMATS)}, got {value!r}")
    if key == "workers":
        return parse_workers(value)
    if key == "token_realms":
        return parse_token_realms(value)
    if key in ("tls_cert", "tls_key") and value != "":
        _check_readable(value)
    if key == "public_url" and value != "":
        return _check_url(value)
    if key == "admin_token" and value != "" and not (isinstance(value, str) and _TOKEN_RE.fullmatch(value)):
        raise ValueError("expected printable ASCII without spaces (it travels in an Authorization header)")
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"expected a string or number, got {type(value).__name__}")
    return value


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Read the file (if any), apply `MIRROR_<SECTION>_<KEY>` variables, then `overrides`."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = path
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(path, "-", "file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "-", f"cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    for key in raw:
        if key not in ("server", "cache", "storage", "upstreams"):
            raise ConfigError(source, key, "unknown section (known: server, cache, storage, upstreams)")
        if not isinstance(raw[key], dict):
            raise ConfigError(source, key, "expected a table")
    server_raw = dict(raw.get("server", {}))
    cache_raw = dict(raw.get("cache", {}))
    storage_raw = dict(raw.get("storage", {}))
    s3_raw = storage_raw["s3"] = dict(storage_raw.get("s3", {})) if isinstance(storage_raw.get("s3", {}), dict) \
        else storage_raw["s3"]
    origins: dict[str, str] = {}  # "section.key" → where the value came from, when not the file
    for name, value in (env if env is not None else os.environ).items():
        for section, target in (("SERVER", server_raw), ("CACHE", cache_raw), ("STORAGE_S3", s3_raw),
                                ("STORAGE", storage_raw)):
            prefix = f"MIRROR_{section}_"
            if name.startswith(prefix):
                key = name[len(prefix):].lower()
                target[key] = value
                origins[f"{section.lower().replace('_', '.')}.{key}"] = f"environment {name}"
                break
    for key, value in (overrides or {}).items():
        server_raw[key] = value
        origins[f"server.{key}"] = f"command line --{key.replace('_', '-')}"

    def section(cls: type, data: dict[str, Any], name: str) -> Any:
        try:
            return _build(cls, data, source, name)
        except ConfigError as exc:
            if exc.key in origins:
                raise ConfigError(origins[exc.key], exc.key, exc.reason) from None
            raise

    server = section(ServerConfig, server_raw, "server")
    if (problem := _check_tls(server)) is not None:
        key = "server.tls_key" if server.tls_cert and not server.tls_key else "server.tls_cert"
        raise ConfigError(origins.get(key, source), key, problem)
    cache = section(CacheConfig, cache_raw, "cache")
    try:
        storage = _storage(storage_raw, source)
    except ConfigError as exc:
        if exc.key in origins:
            raise ConfigError(origins[exc.key], exc.key, exc.reason) from None
        raise
    upstreams = Config().upstreams
    if "upstreams" in raw:
        upstreams = {}
        for name, table in raw["upstreams"].items():
            if not isinstance(table, dict):
                raise ConfigError(source, f"upstreams.{name}", "expected a table")
            upstreams[name] = _upstream(table, source, name)
    if server.default_upstream not in upstreams:
        raise ConfigError(
            origins.get("server.default_upstream", source), "server.default_upstream",
            f"{server.default_upstream!r} is not a configured upstream (configured: {', '.join(upstreams)})",
        )
    return Config(server=server, cache=cache, storage=storage, upstreams=upstreams)
