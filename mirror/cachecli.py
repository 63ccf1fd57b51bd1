"""`mirror cache …` and `mirror warm …`: maintenance against a running mirror or a stopped one's data.

`mirror cache` finds its own way in. With a mirror running on the data directory
(it holds the directory's lock), the command goes over that mirror's admin socket,
`<data_dir>/admin.sock`, which only the mirror's user (and root) can open; with
none running, it opens the data directory itself, holding the lock so no server
starts meanwhile. `--url` sends it over TCP instead, to a mirror on this host or
another, with the bearer token `server.admin_token` (or `--admin-token-file`).
`mirror warm` pulls through the registry API, over TCP.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror import adminsocket
from mirror import config as configuration
from mirror.app import build
from mirror.cache.admin import OPERATIONS, AdminError, perform
from mirror.cache.warm import warm
from mirror.storage.lock import DataDirBusy, DataDirLock
from mirror.storage.metadata import SchemaTooNew
from mirror.storage.secret import SecretError
from mirror.upstream.credentials import basic_authorization

EXIT_FAILED = 1
EXIT_USAGE = 2
TIMEOUT = 600.0  # seconds for one admin request: a purge or gc of a large cache takes a while


class CommandError(Exception):
    """A clear message for the user; nothing was changed."""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser, url: str) -> None:
        p.add_argument("--config", help="the mirror's TOML configuration file")
        p.add_argument("--data-dir", help="the data directory (default: from the configuration)")
        p.add_argument("--url", help=url)

    def admin(p: argparse.ArgumentParser) -> None:
        common(p, "go over TCP to the mirror at this URL, e.g. https://mirror.internal:5000, sending the "
                  "admin token (default: the admin socket of the mirror running on the data directory)")
        p.add_argument("--admin-token-file", metavar="FILE",
                       help="with --url: read the admin token from FILE (default: server.admin_token)")

    cache = sub.add_parser("cache", help="inspect and maintain the cache").add_subparsers(dest="cache_command", required=True)
    stats = cache.add_parser("stats", help="size, cap, objects, hit ratio, top repositories")
    stats.add_argument("--json", action="store_true", help="print JSON")
    admin(stats)
    for name, text in (("pin", "never evict an image (a tag or digest; for an index, every platform)"),
                       ("unpin", "let a pinned image be evicted again")):
        p = cache.add_parser(name, help=text)
        p.add_argument("ref", help="e.g. alpine:3, ghcr.io/org/img:tag, quay.io/x/y@sha256:…")
        admin(p)
    purge = cache.add_parser("purge", help="remove an image, a repository's content, or what was not used lately")
    purge.add_argument("ref", nargs="?", help="an image reference")
    purge.add_argument("--repo", help="a repository, e.g. library/alpine or ghcr.io/org/img")
    purge.add_argument("--older-than", type=_duration, help="not used for this long, e.g. 30d or 12h")
    admin(purge)
    admin(cache.add_parser("gc", help="reconcile metadata with files; remove orphans and stale temp files"))

    w = sub.add_parser("warm", help="pre-pull images through a running mirror, with progress")
    w.add_argument("refs", nargs="*", help="image references, e.g. alpine:3 ghcr.io/org/img:tag")
    w.add_argument("--file", help="read references from this file (one per line, # comments)")
    w.add_argument("--platform", action="append", default=[], help="os/arch[/variant] (repeatable; default: all)")
    w.add_argument("--jobs", type=int, default=4, help="images pulled at once (default 4)")
    w.add_argument("--user", help="USER:PASSWORD to pull with (default: anonymous)")
    common(w, "the running mirror's URL (default: from server.listen)")


def _duration(text: str) -> str:
    try:
        configuration.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args: argparse.Namespace) -> int:
    try:
        cfg = configuration.load(args.config, overrides={"data_dir": args.data_dir} if args.data_dir else None)
    except configuration.ConfigError as exc:
        print(f"mirror: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "warm":
            return _warm(args, cfg)
        return _cache(args, cfg)
    except (CommandError, AdminError, SecretError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _url(args: argparse.Namespace, cfg: configuration.Config) -> str:
    if args.url:
        return args.url.rstrip("/")
    host, port = cfg.host_port
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    scheme = "https" if cfg.server.tls_cert else "http"
    return f"{scheme}://{host}:{port}"


def _cache(args: argparse.Namespace, cfg: configuration.Config) -> int:
    op = args.cache_command
    arguments = {key: value for key in ("ref", "repo", "older_than") if (value := getattr(args, key, None)) is not None}
    if args.admin_token_file is not None and not args.url:
        raise CommandError("--admin-token-file goes with --url (the admin socket needs no token)")
    if args.url:
        result = _over_tcp(args.url, op, arguments, _token(args, cfg))
    else:
        data_dir = Path(cfg.server.data_dir)
        if not (data_dir / "index.db").is_file():
            raise CommandError(f"{data_dir} is not a mirror data directory (no index.db): check --data-dir or --config")
        lock = DataDirLock(data_dir)
        try:
            lock.acquire()
        except DataDirBusy:
            result = _over_socket(adminsocket.path_in(data_dir), op, arguments)
        except PermissionError:
            raise CommandError(f"permission denied on {lock.path}: run this command as the user the mirror "
                               "runs as (or as root)") from None
        else:
            try:
                result = asyncio.run(_local(cfg, op, arguments))
            finally:
                lock.release()
    _print(op, result, getattr(args, "json", False))
    return 0


def _token(args: argparse.Namespace, cfg: configuration.Config) -> str:
    if args.admin_token_file is None:
        return cfg.server.admin_token
    try:
        return Path(args.admin_token_file).read_text().strip()
    except OSError as exc:
        raise CommandError(f"--admin-token-file: cannot read {args.admin_token_file}: {exc.strerror}") from None


class _Refused(Exception):
    """The mirror answered the admin request with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _SocketConnection(http.client.HTTPConnection):
    """HTTP over the admin socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = adminsocket.connect(self.socket_path, TIMEOUT)


def _exchange(connection: http.client.HTTPConnection, prefix: str, op: str, arguments: dict[str, Any],
              headers: dict[str, str]) -> dict[str, Any]:
    """One admin request; its JSON answer, or _Refused with the mirror's message."""
    changes = OPERATIONS[op].changes
    connection.request("POST" if changes else "GET", f"{prefix}/admin/{op}",
                       body=json.dumps(arguments).encode() if changes else None,
                       headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    body = response.read()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if response.status == 200 and isinstance(answer, dict):
        return answer
    try:
        message = answer["errors"][0]["message"]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        message = f"HTTP {response.status} {response.reason}"
    raise _Refused(response.status, str(message))


def _over_socket(path: Path, op: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Ask the mirror that holds the data directory, over its admin socket."""
    connection = _SocketConnection(path)
    try:
        return _exchange(connection, "", op, arguments, {})
    except _Refused as exc:
        raise CommandError(str(exc)) from None
    except FileNotFoundError:
        raise CommandError(f"a mirror holds {path.parent}, but its admin socket {path} is missing (is the mirror "
                           "still starting, or a version without one?); retry, or go over TCP with --url") from None
    except PermissionError:
        raise CommandError(f"permission denied on the admin socket {path}: run this command as the user the "
                           "mirror runs as (or as root)") from None
    except ConnectionRefusedError:
        raise CommandError(f"a mirror holds {path.parent}, but nothing answers on its admin socket {path} "
                           "(is it restarting?); retry shortly") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CommandError(f"the admin socket {path} failed: {exc}") from None
    finally:
        connection.close()


def _over_tcp(url: str, op: str, arguments: dict[str, Any], token: str) -> dict[str, Any]:
    """Ask the mirror at `url`, sending the admin token."""
    where = urlsplit(url)
    if where.scheme not in ("http", "https") or not where.hostname:
        raise CommandError(f"--url: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
    kind = http.client.HTTPSConnection if where.scheme == "https" else http.client.HTTPConnection
    connection = kind(where.netloc, timeout=TIMEOUT)
    try:
        return _exchange(connection, where.path.rstrip("/"), op, arguments,
                         {"Authorization": f"Bearer {token}"} if token else {})
    except _Refused as exc:
        if exc.status == 401:
            raise CommandError(f"{url.rstrip('/')}: the admin token is missing or wrong; give the mirror's "
                               "server.admin_token (in --config, MIRROR_SERVER_ADMIN_TOKEN or --admin-token-file)"
                               ) from None
        if exc.status == 403:
            raise CommandError(f"{url.rstrip('/')} refused: {exc}") from None
        raise CommandError(str(exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CommandError(f"{url.rstrip('/')} does not answer ({exc})") from None
    finally:
        connection.close()


async def _local(cfg: configuration.Config, op: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Carry out the operation on the data directory of a stopped mirror (the caller holds its lock)."""
    parts = build(cfg)
    try:
        await parts.open()
    except SchemaTooNew as exc:
        raise CommandError(str(exc)) from None
    try:
        return await perform(parts.admin, op, arguments)
    finally:
        await parts.close()


def _print(op: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json or op != "stats":
        print(json.dumps(result, indent=2) if as_json else "  ".join(f"{k}: {v}" for k, v in result.items()))
        return
    mib = 2**20
    print(f"size     {result['size_bytes'] / mib:.1f} MiB of {result['max_bytes'] / mib:.1f} MiB")
    print("objects  " + ", ".join(f"{n} {kind}s" for kind, n in sorted(result["objects"].items())))
    hits = result.get("hit_ratio")
    if hits is not None:
        print(f"hits     {hits:.1%} of requests since start")
    if result.get("oldest_access"):
        print(f"oldest   last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(result['oldest_access']))}")
    if bucket := result.get("bucket"):
        cap = f" of {bucket['max_bytes'] / mib:.1f} MiB" if bucket["max_bytes"] else " (no cap)"
        print(f"bucket   {bucket['location']}: {bucket['objects']} objects, {bucket['size_bytes'] / mib:.1f} MiB{cap}")
    if result["pins"]:
        print("pinned   " + ", ".join(result["pins"]))
    for title, key, unit in (("largest", "top_by_size", "bytes"), ("most hit", "top_by_hits", "hits")):
        for row in result[key]:
            value = f"{row[unit] / mib:.1f} MiB" if unit == "bytes" else f"{row[unit]} hits"
            print(f"{title:8} {row['repository']}  {value}")
            title = ""


def _warm(args: argparse.Namespace, cfg: configuration.Config) -> int:
    refs = list(args.refs)
    if args.file:
        try:
            lines = Path(args.file).read_text().splitlines()
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
        refs += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not refs:
        raise CommandError("warm needs image references (arguments or --file)")
    authorization = None
    if args.user:
        user, sep, password = args.user.partition(":")
        if not sep:
            raise CommandError("--user takes USER:PASSWORD")
        authorization = basic_authorization(user, password)
    summary = asyncio.run(warm(_url(args, cfg), refs, args.platform, args.jobs, authorization))
    for line in summary.lines():
        print(line)
    return EXIT_FAILED if summary.failed else 0
