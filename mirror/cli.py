"""Command line: `mirror serve` (the default), `mirror check-config` and `mirror config <client>`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

from mirror import adminsocket, cachecli, clientconfig, server
from mirror import config as configuration
from mirror.config import EXIT_CONFIG
from mirror.observe import ACCESS_LOGGER, AccessLogger, setup_logging
from mirror.app import make_app
from mirror.storage.lock import DataDirBusy
from mirror.storage.metadata import SchemaTooNew
from mirror.storage.bucket import BucketError
from mirror.storage.secret import SecretError
from mirror.workers import supervisor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through cache for container registries.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the mirror (default)")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--data-dir", help="where cached content and metadata live (default ./mirror-data)")
    check = sub.add_parser("check-config", help="validate a configuration file and print the result")
    check.add_argument("file")
    client = sub.add_parser(
        "config", help="print (or write) client configuration for this mirror",
        description="Print the configuration that makes a client pull through this mirror.",
    )
    client.add_argument("client", choices=clientconfig.CLIENTS)
    client.add_argument("--url", help="the mirror's URL as clients reach it, e.g. http://mirror.internal:5000 "
                                      "(default: server.public_url of --config)")
    client.add_argument("--registry", nargs="+", action="extend", metavar="HOST",
                        help="registries to mirror (default: every configured upstream)")
    client.add_argument("--config", help="the mirror's TOML configuration (its upstreams and public_url)")
    client.add_argument("--write", metavar="DIR", help="write the files under DIR instead of printing them")
    cachecli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "config":
        return _client_config(args)
    if args.command in ("cache", "warm"):
        return cachecli.run(args)
    return _serve(getattr(args, "config", None), getattr(args, "listen", None), getattr(args, "data_dir", None))


def _load(path: str | None, overrides: dict[str, str]) -> configuration.Config | None:
    try:
        return configuration.load(path, overrides=overrides)
    except configuration.ConfigError as exc:
        print(f"mirror: configuration error: {exc}", file=sys.stderr)
        return None


def _check_config(path: str) -> int:
    cfg = _load(path, {})
    if cfg is None:
        return EXIT_CONFIG
    print(f"{path}: OK")
    print(f"  listen {cfg.server.listen} ({cfg.server.workers} worker{'s' if cfg.server.workers > 1 else ''}), "
          f"data in {cfg.server.data_dir}, default upstream {cfg.server.default_upstream}")
    print(f"  admin API on the unix socket {adminsocket.path_in(cfg.server.data_dir)}"
          + (", and over TCP with the bearer token server.admin_token" if cfg.server.admin_token
             else " (not over TCP: server.admin_token is not set)"))
    if cfg.storage.backend == "s3":
        s3 = cfg.storage.s3
        print(f"  content shared in s3://{s3.bucket}/{s3.prefix} at {s3.endpoint_url or 'AWS, ' + s3.region} "
              f"({'clients redirected to it' if s3.redirect else 'bytes sent by the mirror'}; "
              f"{'evicted beyond ' + s3.max_size if s3.max_size else 'never evicted by the mirror'}), "
              f"local copies in {cfg.server.data_dir}")
    for up in cfg.upstreams.values():
        realms = ", ".join([urlsplit(up.url).hostname or up.url, *up.token_realms])
        print(f"  upstream {up.name}: {up.url} (tag TTL {up.tag_ttl:g}s; credentials go to token realms on {realms})")
    return 0


def _client_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config, {})
    if cfg is None:
        return EXIT_CONFIG
    url = args.url or cfg.server.public_url
    if not url:
        print("mirror config: give the mirror's URL with --url (or server.public_url in --config)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        registries = clientconfig.check_registries(args.registry or list(cfg.upstreams), cfg.upstreams)
        if args.client == "containerd":
            files = clientconfig.containerd(url, registries)
        elif args.client == "podman":
            files = clientconfig.podman(url, registries)
        else:
            files, notes = clientconfig.docker(url, registries if args.registry else ["docker.io"])
            for note in notes:
                print(f"# {note}", file=sys.stderr)
            if cfg.server.default_upstream != "docker.io":
                print(f"# warning: this mirror's default upstream is {cfg.server.default_upstream}, "
                      "so Docker's mirrored Docker Hub pulls would go there", file=sys.stderr)
    except clientconfig.ClientConfigError as exc:
        print(f"mirror config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.write is None:
        for i, (name, text) in enumerate(files.items()):
            if len(files) > 1:
                print(("\n" if i else "") + f"# --- {name} ---")
            print(text, end="")
        return 0
    root = Path(args.write)
    for name, text in files.items():
        target = root / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        except OSError as exc:
            print(f"mirror config: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {target}", file=sys.stderr)
    return 0


def _serve(path: str | None, listen: str | None, data_dir: str | None) -> int:
    overrides = {k: v for k, v in (("listen", listen), ("data_dir", data_dir)) if v is not None}
    cfg = _load(path, overrides)
    if cfg is None:
        return EXIT_CONFIG
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    host, port = cfg.host_port
    tls = configuration.ssl_context(cfg.server)
    scheme = "https" if tls else "http"
    try:
        if cfg.server.workers > 1:
            return supervisor.serve(cfg, tls, host, port)
        asyncio.run(server.serve(
            make_app(cfg), host, port, tls,
            lambda: logging.getLogger("mirror").info("listening on %s://%s:%d", scheme, host, port),
            access_log_class=AccessLogger,
            access_log=logging.getLogger(ACCESS_LOGGER),
            shutdown_timeout=cfg.server.shutdown_timeout,
        ))
    except (SchemaTooNew, DataDirBusy, SecretError, BucketError, adminsocket.AdminSocketError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"mirror: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
