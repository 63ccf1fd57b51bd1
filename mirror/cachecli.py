"""`mirror cache …` and `mirror warm …`: maintenance against a running mirror or a stopped one's data.

With a server running on the data directory (it holds the directory's lock), the
commands go through its `/admin/` API; otherwise they open the data directory
themselves, holding the lock so no server starts meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mirror import config as configuration
from mirror.cache.admin import AdminError, CacheAdmin
from mirror.cache.eviction import Evictor, cap_bytes
from mirror.cache.warm import warm
from mirror.metrics import Metrics
from mirror.routing import Router
from mirror.storage.filestore import FileStore
from mirror.storage.lock import DataDirBusy, DataDirLock
from mirror.storage.metadata import Metadata, SchemaTooNew
from mirror.storage.secret import SecretError, data_dir_secret, derive
from mirror.upstream.authorizer import TokenCache
from mirror.upstream.credentials import Fingerprinter, basic_authorization
from mirror.upstream.client import Upstream
from mirror.upstream.ratelimit import RateLimits

EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A clear message for the user; nothing was changed."""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="the mirror's TOML configuration file")
        p.add_argument("--data-dir", help="the data directory (default: from the configuration)")
        p.add_argument("--url", help="a running mirror's URL (default: from server.listen)")

    cache = sub.add_parser("cache", help="inspect and maintain the cache").add_subparsers(dest="cache_command", required=True)
    stats = cache.add_parser("stats", help="size, cap, objects, hit ratio, top repositories")
    stats.add_argument("--json", action="store_true", help="print JSON")
    common(stats)
    for name, text in (("pin", "never evict an image (a tag or digest; for an index, every platform)"),
                       ("unpin", "let a pinned image be evicted again")):
        p = cache.add_parser(name, help=text)
        p.add_argument("ref", help="e.g. alpine:3, ghcr.io/org/img:tag, quay.io/x/y@sha256:…")
        common(p)
    purge = cache.add_parser("purge", help="remove an image, a repository's content, or what was not used lately")
    purge.add_argument("ref", nargs="?", help="an image reference")
    purge.add_argument("--repo", help="a repository, e.g. library/alpine or ghcr.io/org/img")
    purge.add_argument("--older-than", help="not used for this long, e.g. 30d or 12h")
    common(purge)
    common(cache.add_parser("gc", help="reconcile metadata with files; remove orphans and stale temp files"))

    w = sub.add_parser("warm", help="pre-pull images through a running mirror, with progress")
    w.add_argument("refs", nargs="*", help="image references, e.g. alpine:3 ghcr.io/org/img:tag")
    w.add_argument("--file", help="read references from this file (one per line, # comments)")
    w.add_argument("--platform", action="append", default=[], help="os/arch[/variant] (repeatable; default: all)")
    w.add_argument("--jobs", type=int, default=4, help="images pulled at once (default 4)")
    w.add_argument("--user", help="USER:PASSWORD to pull with (default: anonymous)")
    common(w)


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
    scheme = "https" if getattr(cfg.server, "tls_cert", "") else "http"
    return f"{scheme}://{host}:{port}"


def _cache(args: argparse.Namespace, cfg: configuration.Config) -> int:
    op, body = args.cache_command, {}
    if op in ("pin", "unpin"):
        body = {"ref": args.ref}
    elif op == "purge":
        chosen = [k for k, v in (("ref", args.ref), ("repo", args.repo), ("older_than", args.older_than)) if v]
        if len(chosen) != 1:
            raise CommandError("cache purge takes exactly one of: REF, --repo NAME, --older-than DURATION")
        if args.older_than:
            try:
                configuration.parse_duration(args.older_than)
            except ValueError as exc:
                raise CommandError(f"--older-than: {exc}") from None
        body = {chosen[0]: getattr(args, chosen[0])}
    data_dir = Path(cfg.server.data_dir)
    lock = DataDirLock(data_dir)
    if not (data_dir / "index.db").is_file():
        raise CommandError(f"{data_dir} is not a mirror data directory (no index.db): check --data-dir or --config")
    try:
        lock.acquire()
    except DataDirBusy:
        result = _remote(_url(args, cfg), op, body, getattr(cfg.server, "admin_token", ""))
    else:
        try:
            result = asyncio.run(_local(cfg, data_dir, op, body))
        finally:
            lock.release()
    _print(op, result, getattr(args, "json", False))
    return 0


def _remote(url: str, op: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    """Ask the running mirror that owns the data directory."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if op == "stats" else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/admin/{op}", data=data, headers=headers, method="GET" if op == "stats" else "POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["errors"][0]["message"]
        except (ValueError, KeyError, IndexError):
            message = err.reason
        raise CommandError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"a mirror holds the data directory, but {url} does not answer ({exc}); use --url") from None


async def _local(cfg: configuration.Config, data_dir: Path, op: str, body: dict[str, Any]) -> dict[str, Any]:
    """Carry out the operation on the data directory of a stopped mirror."""
    metrics = Metrics()
    store = FileStore(data_dir)
    metadata = Metadata(data_dir / "index.db")
    try:
        await metadata.open()
    except SchemaTooNew as exc:
        raise CommandError(str(exc)) from None
    tokens, limits = TokenCache(), RateLimits(metrics)
    fingerprints = Fingerprinter(derive(data_dir_secret(data_dir), "fingerprint"))
    upstreams = {n: Upstream(c, tokens, limits, metrics, fingerprints) for n, c in cfg.upstreams.items()}
    cap = lambda: cap_bytes(cfg.cache.max_size, data_dir)  # noqa: E731
    admin = CacheAdmin(store, metadata, Router(upstreams, cfg.server.default_upstream),
                       Evictor(store, metadata, metrics, cap), cap)
    try:
        if op == "stats":
            return await admin.stats()
        if op == "pin":
            return await admin.pin(body["ref"])
        if op == "unpin":
            return await admin.unpin(body["ref"])
        if op == "purge":
            older = body.get("older_than")
            return await admin.purge(image=body.get("ref"), repo=body.get("repo"),
                                     older_than=configuration.parse_duration(older) if older else None)
        return await admin.gc()
    finally:
        await metadata.close()


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
