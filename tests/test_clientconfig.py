"""`mirror config containerd|docker|podman`: the generated files parse and say what each client needs."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from mirror import clientconfig
from mirror.cli import main

URL = "http://mirror.internal:5000"
FOUR = ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]


def test_containerd_one_hosts_toml_per_registry() -> None:
    files = clientconfig.containerd(URL, FOUR)
    assert sorted(files) == sorted(f"{r}/hosts.toml" for r in FOUR)
    servers = {}
    for name, text in files.items():
        doc = tomllib.loads(text)
        servers[name.split("/")[0]] = doc["server"]
        assert doc["host"] == {URL: {"capabilities": ["pull", "resolve"]}}
    assert servers == {
        "docker.io": "https://registry-1.docker.io",
        "ghcr.io": "https://ghcr.io",
        "quay.io": "https://quay.io",
        "registry.k8s.io": "https://registry.k8s.io",
    }


def test_containerd_https_mirror() -> None:
    doc = tomllib.loads(clientconfig.containerd("https://mirror.example:8443", ["ghcr.io"])["ghcr.io/hosts.toml"])
    assert doc["host"] == {"https://mirror.example:8443": {"capabilities": ["pull", "resolve"]}}


def test_docker_daemon_json_mirrors_docker_hub_and_trusts_plain_http() -> None:
    files, notes = clientconfig.docker(URL, ["docker.io", "ghcr.io"])
    assert json.loads(files["daemon.json"]) == {
        "registry-mirrors": [URL],
        "insecure-registries": ["mirror.internal:5000"],
    }
    assert "Docker Hub (docker.io) images only" in notes[0]
    assert any("ghcr.io" in n for n in notes[1:])
    files, _ = clientconfig.docker("https://mirror.example", ["docker.io"])
    assert json.loads(files["daemon.json"]) == {"registry-mirrors": ["https://mirror.example"]}


def test_podman_registries_conf_mirrors_each_registry_by_path_prefix() -> None:
    doc = tomllib.loads(clientconfig.podman(URL, FOUR)["registries.conf"])
    assert doc["registry"] == [
        {"prefix": r, "location": r, "mirror": [{"location": f"mirror.internal:5000/{r}", "insecure": True}]}
        for r in FOUR
    ]
    doc = tomllib.loads(clientconfig.podman("https://mirror.example", ["quay.io"])["registries.conf"])
    assert doc["registry"] == [{"prefix": "quay.io", "location": "quay.io", "mirror": [{"location": "mirror.example/quay.io"}]}]


@pytest.mark.parametrize("url", ["mirror.internal:5000", "ftp://m", "http://m:5000/v2", "http://u:p@m", "http://m:99999", "http://"])
def test_bad_mirror_urls_are_refused(url: str) -> None:
    with pytest.raises(clientconfig.ClientConfigError):
        clientconfig.parse_mirror_url(url)


def test_registries_must_be_served_by_the_mirror() -> None:
    served = ["docker.io", "ghcr.io"]
    assert clientconfig.check_registries(["index.docker.io", "GHCR.io", "docker.io"], served) == ["docker.io", "ghcr.io"]
    with pytest.raises(clientconfig.ClientConfigError, match="does not serve 'quay.io'"):
        clientconfig.check_registries(["quay.io"], served)


def test_cli_prints_containerd_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "containerd", "--url", URL, "--registry", "docker.io", "--registry", "quay.io"]) == 0
    out = capsys.readouterr().out
    parts = out.split("# --- ")
    assert [p.split(" ---")[0] for p in parts[1:]] == ["docker.io/hosts.toml", "quay.io/hosts.toml"]
    for part in parts[1:]:
        assert tomllib.loads(part.split("\n", 1)[1])["host"][URL]["capabilities"] == ["pull", "resolve"]


def test_cli_writes_containerd_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "containerd", "--url", URL, "--registry", *FOUR, "--write", str(tmp_path / "certs.d")]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(f"certs.d/{r}/hosts.toml" for r in FOUR)
    assert capsys.readouterr().out == ""


def test_cli_docker_prints_json_on_stdout_and_a_comment_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "docker", "--url", URL]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["registry-mirrors"] == [URL]
    assert captured.err.startswith("# Docker uses registry-mirrors for Docker Hub (docker.io) images only")
    assert all(line.startswith("# ") for line in captured.err.splitlines())


def test_cli_podman_defaults_to_every_upstream_of_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "mirror.toml"
    cfg.write_text('[server]\npublic_url = "https://mirror.example:5443"\n'
                   '[upstreams."docker.io"]\nurl = "https://registry-1.docker.io"\n'
                   '[upstreams."ghcr.io"]\nurl = "https://ghcr.io"\n')
    assert main(["config", "podman", "--config", str(cfg), "--write", str(tmp_path / "out")]) == 0
    doc = tomllib.loads((tmp_path / "out" / "registries.conf").read_text())
    assert [(r["prefix"], r["mirror"]) for r in doc["registry"]] == [
        ("docker.io", [{"location": "mirror.example:5443/docker.io"}]),
        ("ghcr.io", [{"location": "mirror.example:5443/ghcr.io"}]),
    ]
    assert "wrote" in capsys.readouterr().err


def test_cli_refuses_unserved_registry_and_missing_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "podman", "--url", URL, "--registry", "registry.example.org"]) == 2
    assert "does not serve 'registry.example.org'" in capsys.readouterr().err
    assert main(["config", "containerd"]) == 2
    assert "--url" in capsys.readouterr().err
    assert main(["config", "docker", "--url", "mirror.internal:5000"]) == 2
    assert "expected the mirror's URL" in capsys.readouterr().err
