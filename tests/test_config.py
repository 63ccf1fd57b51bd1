"""Configuration: defaults < TOML file < MIRROR_* env < CLI flags; errors name file, key and reason."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import DEFAULT_UPSTREAMS, ConfigError, load, parse_duration, parse_size, split_listen, usable_cpus


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return str(path)


def _error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def test_defaults_without_a_file() -> None:
    cfg = load(None, env={})
    assert cfg.server.listen == "0.0.0.0:5000"
    assert cfg.host_port == ("0.0.0.0", 5000)
    assert cfg.server.data_dir == "./mirror-data"
    assert cfg.server.default_upstream == "docker.io"
    assert list(cfg.upstreams) == [
        "docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io", "public.ecr.aws", "mcr.microsoft.com",
    ]
    assert cfg.upstreams["docker.io"].url == "https://registry-1.docker.io"
    assert {u.url for u in cfg.upstreams.values()} == set(DEFAULT_UPSTREAMS.values())
    assert all(u.tag_ttl == 600 for u in cfg.upstreams.values())
    assert all(u.revalidate_timeout == 3 for u in cfg.upstreams.values())
    assert all(name == u.name for name, u in cfg.upstreams.items())


def test_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = load(_file(tmp_path, """
        [server]
        listen = "127.0.0.1:6000"
        data_dir = "/srv/mirror"
        log_level = "debug"
        [cache]
        max_size = "200GiB"
    """), env={})
    assert cfg.host_port == ("127.0.0.1", 6000)
    assert cfg.server.data_dir == "/srv/mirror"
    assert cfg.server.log_level == "debug"
    assert cfg.cache.max_size == "200GiB"
    assert list(cfg.upstreams) == list(DEFAULT_UPSTREAMS)  # no [upstreams]: the built-in list stays


def test_a_file_naming_some_upstreams_replaces_the_list(tmp_path: Path) -> None:
    cfg = load(_file(tmp_path, """
        [server]
        default_upstream = "ghcr.io"
        [upstreams."ghcr.io"]
        url = "https://ghcr.io/"
        tag_ttl = "1h"
        read_timeout = 5
        revalidate_timeout = "500ms"
        [upstreams."registry.local"]
        url = "http://10.0.0.5:5000"
    """), env={})
    assert list(cfg.upstreams) == ["ghcr.io", "registry.local"]
    ghcr = cfg.upstreams["ghcr.io"]
    assert (ghcr.name, ghcr.url, ghcr.tag_ttl, ghcr.read_timeout) == ("ghcr.io", "https://ghcr.io", 3600, 5)
    assert ghcr.revalidate_timeout == 0.5
    assert cfg.upstreams["registry.local"].url == "http://10.0.0.5:5000"
    assert cfg.upstreams["registry.local"].tag_ttl == 600


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _file(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\ndata_dir = "/from/file"\n')
    env = {
        "MIRROR_SERVER_LISTEN": "127.0.0.1:7000",
        "MIRROR_SERVER_DATA_DIR": "/from/env",
        "MIRROR_CACHE_MAX_SIZE": "10GiB",
        "UNRELATED": "x",
    }
    cfg = load(path, env=env)
    assert (cfg.server.listen, cfg.server.data_dir, cfg.cache.max_size) == ("127.0.0.1:7000", "/from/env", "10GiB")


def test_cli_overrides_beat_env(tmp_path: Path) -> None:
    env = {"MIRROR_SERVER_LISTEN": "127.0.0.1:7000", "MIRROR_SERVER_DATA_DIR": "/from/env"}
    cfg = load(None, env=env, overrides={"listen": "127.0.0.1:8000", "data_dir": "/from/cli"})
    assert (cfg.server.listen, cfg.server.data_dir) == ("127.0.0.1:8000", "/from/cli")


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("[sever]\nlisten = '0.0.0.0:1'\n", "sever", "unknown section"),
    ("server = 5\n", "server", "expected a table"),
    ("[server]\nlisen = '0.0.0.0:1'\n", "server.lisen", "unknown key"),
    ("[server]\nlisten = '0.0.0.0'\n", "server.listen", "HOST:PORT"),
    ("[server]\nlisten = '0.0.0.0:70000'\n", "server.listen", "HOST:PORT"),
    ("[server]\ndata_dir = 5\n", "server.data_dir", "expected a string"),
    ("[server]\nlog_level = 'loud'\n", "server.log_level", "expected one of"),
    ("[server]\nshutdown_timeout = '5 minutes'\n", "server.shutdown_timeout", "expected a duration"),
    ("[server]\nworkers = 0\n", "server.workers", 'expected "auto" or a number of processes from 1 to 64'),
    ("[server]\nworkers = 'many'\n", "server.workers", "got 'many'"),
    ("[server]\nworkers = true\n", "server.workers", "got True"),
    ("[cache]\nmax_size = 'lots'\n", "cache.max_size", "expected a size"),
    ("[cache]\nmax_size = '120%'\n", "cache.max_size", "percentage"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\ntag_ttl = '10 mins'\n", "upstreams.ghcr.io.tag_ttl", "duration"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\ntag_ttl = -5\n", "upstreams.ghcr.io.tag_ttl", "duration"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\nrevalidate_timeout = 'soon'\n", "upstreams.ghcr.io.revalidate_timeout",
     "expected a duration"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\nrevalidate_timeout = '0s'\n", "upstreams.ghcr.io.revalidate_timeout",
     "above zero"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\nusernme = 'x'\n", "upstreams.ghcr.io.usernme", "unknown key"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\nname = 'x'\n", "upstreams.ghcr.io.name", "unknown key"),
    ("[upstreams.'ghcr.io']\nurl = 'ftp://ghcr.io'\n", "upstreams.ghcr.io.url", "http:// or https://"),
    ("[upstreams.'ghcr.io']\nurl = 'ghcr.io'\n", "upstreams.ghcr.io.url", "http:// or https://"),
    ("[upstreams.'ghcr.io']\ntag_ttl = '1h'\n", "upstreams.ghcr.io.url", "missing"),
    ("[upstreams]\nghcr = 'https://ghcr.io'\n", "upstreams.ghcr", "expected a table"),
    ("[upstreams.'ghcr.io']\nurl = 'https://ghcr.io'\n", "server.default_upstream", "'docker.io' is not a configured"),
])
def test_errors_name_the_file_the_key_and_the_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = _error(tmp_path, text)
    assert err.key == key
    assert reason in err.reason
    assert key in str(err) and reason in str(err)


def test_workers_auto_is_one_per_usable_cpu_up_to_eight(tmp_path: Path) -> None:
    cpus = usable_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert load(_file(tmp_path, '[server]\nworkers = "auto"\n'), env={}).server.workers == min(cpus, 8)
    assert load(None, env={}).server.workers == min(cpus, 8)  # the default
    assert load(_file(tmp_path, "[server]\nworkers = 3\n"), env={}).server.workers == 3
    assert load(_file(tmp_path, "[server]\n"), env={"MIRROR_SERVER_WORKERS": "2"}).server.workers == 2


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None),
])
def test_a_container_cpu_quota_lowers_the_usable_cpus(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "cpu.max") == (affinity if expected is None else min(expected, affinity))
    assert usable_cpus(tmp_path / "absent") == affinity


def test_invalid_toml(tmp_path: Path) -> None:
    err = _error(tmp_path, "[server\nlisten = ")
    assert "not valid TOML" in err.reason
    assert "line 1" in err.reason


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.source == path
    assert "not found" in str(info.value)


@pytest.mark.parametrize(("var", "value", "key", "reason"), [
    ("MIRROR_SERVER_LISTEN", "nonsense", "server.listen", "'nonsense'"),
    ("MIRROR_CACHE_MAX_SIZE", "huge", "cache.max_size", "'huge'"),
    ("MIRROR_SERVER_DEFAULT_UPSTREAM", "nowhere.io", "server.default_upstream", "'nowhere.io'"),
    ("MIRROR_SERVER_COLOUR", "blue", "server.colour", "unknown key"),
])
def test_bad_env_value_names_the_variable(tmp_path: Path, var: str, value: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(_file(tmp_path, "[server]\n"), env={var: value})
    assert info.value.source == f"environment {var}"
    assert info.value.key == key
    assert reason in info.value.reason


def test_bad_cli_value_names_the_flag_not_the_env_or_file(tmp_path: Path) -> None:
    path = _file(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={"MIRROR_SERVER_LISTEN": "127.0.0.1:7000"}, overrides={"listen": "bogus"})
    assert info.value.source == "command line --listen"
    assert info.value.key == "server.listen"


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("10m", 600), ("1.5h", 5400), ("7d", 604800), ("45", 45), (" 2m ", 120),
    ("0", 0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_numbers() -> None:
    assert parse_duration(90) == 90.0
    assert parse_duration(0.25) == 0.25


@pytest.mark.parametrize("bad", ["", "m", "10x", "10 m", "-5s", "1h30m", "10M", "ten", True, -1, None, [10]])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "parsed"), [
    ("200GiB", (200 * 1024**3, None)),
    ("500MB", (500 * 1000**2, None)),
    ("1.5KiB", (1536, None)),
    ("2 tib", (2 * 1024**4, None)),
    ("1024", (1024, None)),
    ("10B", (10, None)),
    ("80%", (None, 0.8)),
    ("100%", (None, 1.0)),
    ("0.5%", (None, 0.005)),
])
def test_parse_size(text: str, parsed: tuple[int | None, float | None]) -> None:
    assert parse_size(text) == parsed


@pytest.mark.parametrize("bad", ["", "GiB", "-5GiB", "10PB", "10 GiBs", "0%", "101%", "-1%", "abc%", "%", "nan%"])
def test_parse_size_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert split_listen(":5000") == ("0.0.0.0", 5000)
    assert split_listen("[::1]:5000") == ("::1", 5000)
    for bad in ("5000", "host:", "host:0", "host:http"):
        with pytest.raises(ValueError):
            split_listen(bad)


# -- storage ------------------------------------------------------------------------------------

def test_storage_defaults_to_the_filesystem() -> None:
    cfg = load(None, env={})
    assert cfg.storage.backend == "filesystem"
    assert cfg.storage.s3.bucket == "" and cfg.storage.s3.redirect is False


def test_s3_storage_from_the_file_and_keys_from_files(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("AKIDEXAMPLE\n")
    (tmp_path / "secret").write_text("s3cr3t-value\n")
    cfg = load(_file(tmp_path, f"""
[storage]
backend = "s3"
[storage.s3]
endpoint_url = "http://127.0.0.1:9000/"
bucket = "mirror-cache"
prefix = "fleet-a/"
redirect = true
redirect_ttl = "5m"
max_size = "2TiB"
access_key_id_file = "{tmp_path / 'id'}"
secret_access_key_file = "{tmp_path / 'secret'}"
"""), env={})
    s3 = cfg.storage.s3
    assert cfg.storage.backend == "s3"
    assert (s3.endpoint_url, s3.bucket, s3.prefix, s3.region) == ("http://127.0.0.1:9000", "mirror-cache", "fleet-a/", "us-east-1")
    assert (s3.access_key_id, s3.secret_access_key) == ("AKIDEXAMPLE", "s3cr3t-value")
    assert s3.redirect is True and s3.redirect_ttl == 300 and s3.max_size == "2TiB"


def test_s3_storage_from_the_environment(tmp_path: Path) -> None:
    cfg = load(None, env={"MIRROR_STORAGE_BACKEND": "s3", "MIRROR_STORAGE_S3_BUCKET": "from-env",
                          "MIRROR_STORAGE_S3_REDIRECT": "true", "MIRROR_STORAGE_S3_ACCESS_KEY_ID": "AKID\n",
                          "MIRROR_STORAGE_S3_SECRET_ACCESS_KEY": " secret\n"})
    assert (cfg.storage.backend, cfg.storage.s3.bucket, cfg.storage.s3.redirect) == ("s3", "from-env", True)
    assert (cfg.storage.s3.access_key_id, cfg.storage.s3.secret_access_key) == ("AKID", "secret")
    with pytest.raises(ConfigError) as info:
        load(None, env={"MIRROR_STORAGE_S3_PREFIX": "/abs"})
    assert str(info.value).startswith("environment MIRROR_STORAGE_S3_PREFIX: storage.s3.prefix")


@pytest.mark.parametrize("text, key, reason", [
    ('[storage]\nbackend = "nfs"', "storage.backend", "expected one of filesystem, s3"),
    ('[storage]\nbackend = "s3"', "storage.s3.bucket", 'backend "s3" needs a bucket'),
    ('[storage.s3]\nbucket = "Bad_Name"', "storage.s3.bucket", "expected a bucket name"),
    ('[storage.s3]\nbucket = "ab"', "storage.s3.bucket", "expected a bucket name"),
    ('[storage.s3]\nprefix = "no-slash"', "storage.s3.prefix", 'ending in "/"'),
    ('[storage.s3]\nprefix = "/lead/"', "storage.s3.prefix", 'ending in "/"'),
    ('[storage.s3]\nendpoint_url = "ftp://x"', "storage.s3.endpoint_url", "expected an http:// or https:// URL"),
    ('[storage.s3]\naddressing_style = "dns"', "storage.s3.addressing_style", "expected one of path, virtual, auto"),
    ('[storage.s3]\naccess_key_id = "a"', "storage.s3.access_key_id", "set both keys"),
    ('[storage.s3]\naccess_key_id = "a"\naccess_key_id_file = "/x"', "storage.s3.access_key_id_file", "not both"),
    ('[storage.s3]\nsecret_access_key_file = "/nonexistent/secret"\naccess_key_id = "a"',
     "storage.s3.secret_access_key_file", "cannot read /nonexistent/secret"),
    ('[storage.s3]\nmax_size = "50%"', "storage.s3.max_size", "a bucket has no disk"),
    ('[storage.s3]\nredirect = "sometimes"', "storage.s3.redirect", "expected true or false"),
    ('[storage.s3]\nredirect_ttl = "soon"', "storage.s3.redirect_ttl", "expected a duration"),
    ('[storage.s3]\nsize = 3', "storage.s3.size", "unknown key"),
    ('[storage]\ns3 = 3', "storage.s3", "expected a table"),
    ('[storage]\nbucket = "x"', "storage.bucket", "unknown key"),
])
def test_bad_storage_settings_are_refused_with_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    error = _error(tmp_path, text)
    assert error.key == key
    assert reason in error.reason
