"""Command line: `mirror serve` (the default) and `mirror check-config`."""
from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from mirror import config as configuration
from mirror.observe import AccessLogger, setup_logging
from mirror.app import make_app
from mirror.storage.metadata import SchemaTooNew

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through cache for container registries.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the mirror (default)")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--data-dir", help="where cached content and metadata live (default ./mirror-data)")
    check = sub.add_parser("check-config", help="validate a configuration file and print the result")
    check.add_argument("file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
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
    print(f"  listen {cfg.server.listen}, data in {cfg.server.data_dir}, default upstream {cfg.server.default_upstream}")
    for up in cfg.upstreams.values():
        print(f"  upstream {up.name}: {up.url} (tag TTL {up.tag_ttl:g}s)")
    return 0


def _serve(path: str | None, listen: str | None, data_dir: str | None) -> int:
    overrides = {k: v for k, v in (("listen", listen), ("data_dir", data_dir)) if v is not None}
    cfg = _load(path, overrides)
    if cfg is None:
        return EXIT_CONFIG
    setup_logging(cfg.server.log_level)
    host, port = cfg.host_port
    app = make_app(cfg)
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("mirror.access"),
            shutdown_timeout=cfg.server.shutdown_timeout,
            print=lambda msg: logging.getLogger("mirror").info("listening on http://%s:%d", host, port),
        )
    except SchemaTooNew as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"mirror: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
