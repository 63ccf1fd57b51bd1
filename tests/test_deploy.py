"""deploy/ and grafana/: every file parses, the pieces agree with each other, and real validators pass.

`promtool` (Debian `prometheus`) and `systemd-analyze` (Debian `systemd`) check what they can;
without them these checks skip locally and fail under CI=true, like the integration tests.
"""
from __future__ import annotations

import asyncio
import configparser
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from mirror import clientconfig
from mirror import config as configuration
from mirror.storage.secret import data_dir_secret
from tests.conftest import Mirror
from tests.integration.registry import require_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GRAFANA = ROOT / "grafana"
CLIENT_URL = "http://mirror.internal:5000"
CLIENT_REGISTRIES = ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]


def load_yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text())


def load_mirror_toml(text: str, tmp_path: Path) -> configuration.Config:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return configuration.load(str(path), env={})


# -- container image ---------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def healthcheck_command() -> list[str]:
    (rest,) = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + 3:].strip())


def test_dockerfile_slim_non_root_volume_port_healthcheck() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    (user,) = [rest for word, rest in stage if word == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert ("VOLUME", "/var/lib/mirror") in stage
    assert ("EXPOSE", "5000") in stage
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")
    entrypoint = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in stage if word == "CMD"]
    assert entrypoint == [["mirror"]] and cmd == [["serve", "--config", "/etc/mirror/mirror.toml"]]


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    for word, rest in dockerfile_instructions():
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source in allowed, f"{source} is excluded by Dockerfile.dockerignore"


def test_deploy_mirror_toml_is_a_valid_config_matching_the_image(tmp_path: Path) -> None:
    cfg = load_mirror_toml((DEPLOY / "mirror.toml").read_text(), tmp_path)
    assert cfg.server.data_dir == "/var/lib/mirror"
    assert cfg.host_port == ("0.0.0.0", 5000)
    assert cfg.server.log_format == "json"


async def test_the_healthcheck_command_passes_against_a_running_mirror(mirror: Mirror) -> None:
    command = healthcheck_command()
    script = command[2].replace("127.0.0.1:5000", f"127.0.0.1:{mirror.client.port}")
    assert script != command[2]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    await mirror.client.close()  # nothing listening: unhealthy
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stderr=subprocess.DEVNULL)
    assert await proc.wait() != 0


# -- compose + Prometheus + Grafana ---------------------------------------------------


def compose() -> dict:
    doc = load_yaml(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path → host path (relative to deploy/) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_runs_mirror_prometheus_grafana_from_files_that_exist() -> None:
    services = compose()["services"]
    assert set(services) == {"mirror", "prometheus", "grafana"}
    build = services["mirror"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        for volume in service.get("volumes", []):
            if not volume.startswith("."):
                assert volume.split(":")[0] in compose()["volumes"]
    mirror_mounts = bind_mounts(services["mirror"])
    assert mirror_mounts["/etc/mirror/mirror.toml"] == DEPLOY / "mirror.toml"
    assert any(v.endswith(":/var/lib/mirror") for v in services["mirror"]["volumes"])
    assert "5000:5000" in services["mirror"]["ports"]


def test_compose_prometheus_scrapes_the_mirror_service() -> None:
    services = compose()["services"]
    mounts = bind_mounts(services["prometheus"])
    config_path = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert mounts[config_path] == DEPLOY / "prometheus.yml"
    prom = load_yaml(DEPLOY / "prometheus.yml")
    assert isinstance(prom, dict)
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "mirror"]
    assert job["static_configs"][0]["targets"] == ["mirror:5000"]
    for rules in prom["rule_files"]:
        assert mounts[str(Path(config_path).parent / rules)] == DEPLOY / rules


def test_compose_grafana_gets_the_provisioning_and_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "mirror.yaml")
    assert isinstance(provider, dict)
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert mounts[entry["options"]["path"]] == GRAFANA / "dashboards"
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    assert isinstance(datasources, dict)
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus" and ds["isDefault"] is True
    host = urlsplit(ds["url"])
    assert host.hostname in compose()["services"] and host.port == 9090


def test_promtool_checks_prometheus_config_and_alert_rules() -> None:
    promtool = require_binary("promtool")
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
    done = subprocess.run([promtool, "check", "rules", str(DEPLOY / "alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- fleet: haproxy + replicas ----------------------------------------------------------


def haproxy_servers() -> list[tuple[str, str, str]]:
    """(name, environment variable, default host) of each `server` line of the fleet's haproxy.cfg."""
    text = (DEPLOY / "fleet" / "haproxy.cfg").read_text()
    lines = re.findall(r"^\s*server .*$", text, re.MULTILINE)
    servers = re.findall(r'^\s*server (\S+) "\$\{(\w+)-([\w.-]+)\}:5000"\s*$', text, re.MULTILINE)
    assert len(servers) == len(lines), lines
    return servers


def fleet_compose() -> dict:
    doc = load_yaml(DEPLOY / "fleet" / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


def interpolate(value: str, shell: dict[str, str]) -> str:
    """`value` as compose passes it on: `${VAR:-default}` is `shell`'s VAR unless unset or empty,
    then the default; a `${VAR}` without a default must be set."""
    def substitute(m: re.Match[str]) -> str:
        if shell.get(m[1]):
            return shell[m[1]]
        assert m[2] is not None, f"{m[0]} has no default: the fleet would not start without it"
        return m[2]
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", substitute, value)


def compose_script(text: str) -> str:
    """A shell script as compose hands it to the container: `$$` is a literal `$`, and a lone `$`
    would be compose's own interpolation, which the fleet's scripts do not use."""
    assert "$" not in text.replace("$$", ""), f"compose would interpolate in: {text}"
    return text.replace("$$", "$")


def replica_settings(cfg: configuration.Config, env: dict[str, str]) -> None:
    """Every MIRROR_* variable of `env` is a setting `mirror.config.load` took into `cfg`, with its
    value (load ignores a variable whose section it does not know: a typo would be lost)."""
    sections = (("SERVER", cfg.server), ("CACHE", cfg.cache), ("STORAGE_S3", cfg.storage.s3),
                ("STORAGE", cfg.storage))  # the order load matches prefixes in
    for name, value in env.items():
        assert name.startswith("MIRROR_"), f"{name}: not a mirror setting"
        section, settings = next(((s, o) for s, o in sections if name.startswith(f"MIRROR_{s}_")), ("", None))
        assert settings is not None, f"{name}: no such section"
        key = name.removeprefix(f"MIRROR_{section}_").lower()
        assert hasattr(settings, key), f"{name}: no setting {section.lower()}.{key}"
        if isinstance(getattr(settings, key), str):
            assert getattr(settings, key) == value, name


def test_fleet_compose_gives_haproxy_the_replicas_it_names_each_with_its_own_cache() -> None:
    fleet = DEPLOY / "fleet"
    doc = fleet_compose()
    services = doc["services"]
    servers = {name: default for name, _, default in haproxy_servers()}
    assert servers and all(name == host for name, host in servers.items())
    replicas = {name: services[name] for name in servers}
    data_volumes = [next(v.split(":")[0] for v in r["volumes"] if v.endswith(":/var/lib/mirror"))
                    for r in replicas.values()]
    assert len(set(data_volumes)) == len(replicas), "each replica has its own data volume"
    assert services["haproxy"]["ports"] == ["5000:5000"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (fleet / source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in doc["volumes"], f"{name}: volume {source} is not declared"
        if build := service.get("build"):
            assert (fleet / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


MINIO_SHELLS = ({}, {"MINIO_ROOT_USER": "fleet-admin", "MINIO_ROOT_PASSWORD": "s3cret-from-the-operator"})


def test_fleet_compose_runs_minio_and_creates_the_bucket_before_the_replicas() -> None:
    doc = fleet_compose()
    services = doc["services"]
    minio, bucket = services["minio"], services["bucket"]
    assert minio["image"].split(":")[0] == "minio/minio" and minio["command"] == ["server", "/data"]
    (data,) = [v.split(":")[0] for v in minio["volumes"] if v.split(":")[1] == "/data"]
    assert data in doc["volumes"], "the bucket lives in a named volume"
    assert "ports" not in minio, "only the replicas talk to the store"
    assert bucket["image"].split(":")[0] == "minio/mc" and bucket["restart"] == "no"
    assert "minio" in bucket["depends_on"]
    for shell in MINIO_SHELLS:
        root = {k: interpolate(v, shell) for k, v in minio["environment"].items()}
        assert len(root["MINIO_ROOT_USER"]) >= 3 and len(root["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO's minimums
        if shell:
            assert root == shell, "the operator's credentials replace the defaults"
    for name, _, _ in haproxy_servers():
        depends = services[name]["depends_on"]
        assert depends["bucket"] == {"condition": "service_completed_successfully"}, name
        assert depends["secret"] == {"condition": "service_completed_successfully"}, name


def test_fleet_compose_replicas_use_the_bucket_minio_serves(tmp_path: Path) -> None:
    """The replicas' environment, as compose passes it, is accepted by `mirror.config.load` with the
    configuration file they mount, and names MinIO's bucket with MinIO's own credentials."""
    doc = fleet_compose()
    services = doc["services"]
    for shell in MINIO_SHELLS:
        root = {k: interpolate(v, shell) for k, v in services["minio"]["environment"].items()}
        for name, _, _ in haproxy_servers():
            replica = services[name]
            env = {k: interpolate(str(v), shell) for k, v in replica["environment"].items()}
            config_path = replica["command"][replica["command"].index("--config") + 1]
            mounts = {target: source for source, target, *_ in (v.split(":") for v in replica["volumes"])}
            cfg = configuration.load(str(DEPLOY / "fleet" / mounts[config_path]), env=env)
            replica_settings(cfg, env)
            s3 = cfg.storage.s3
            assert cfg.storage.backend == "s3" and s3.bucket == "mirror"
            endpoint = urlsplit(s3.endpoint_url)
            assert endpoint.hostname == "minio" and endpoint.port == 9000  # MinIO's API port, in compose's network
            assert (s3.access_key_id, s3.secret_access_key) == (root["MINIO_ROOT_USER"], root["MINIO_ROOT_PASSWORD"])
            assert not s3.redirect, "clients outside compose cannot reach minio:9000"
        bucket_env = services["bucket"]["environment"].items()
        assert bucket_env <= services["mirror1"]["environment"].items(), "one bucket"


def test_fleet_compose_sizes_fit_the_one_disk_the_volumes_share(tmp_path: Path) -> None:
    """Every volume of a compose project is a directory on the Docker host's disk: a replica's
    cap is a size, not a share of that disk (which each replica and MinIO would count as its
    own), and the bucket has a cap too. The sum is what the comment tells the operator to plan."""
    services = fleet_compose()["services"]
    comment = (FLEET / "compose.yaml").read_text()
    for shell in ({}, {"MIRROR_REPLICA_MAX_SIZE": "50GiB", "MIRROR_BUCKET_MAX_SIZE": "1TiB"}):
        total = 0
        for name, _, _ in haproxy_servers():
            replica_service = services[name]
            env = {k: interpolate(str(v), shell) for k, v in replica_service["environment"].items()}
            config_path = replica_service["command"][replica_service["command"].index("--config") + 1]
            mounts = {target: source for source, target, *_ in (v.split(":") for v in replica_service["volumes"])}
            cfg = configuration.load(str(FLEET / mounts[config_path]), env=env)
            replica, share = configuration.parse_size(cfg.cache.max_size)
            assert replica is not None and share is None, f"{name}: cache.max_size {cfg.cache.max_size!r} is a share"
            total += replica
            bucket, _ = configuration.parse_size(cfg.storage.s3.max_size)
            assert bucket is not None and bucket > replica, "the bucket holds more than any one local copy"
        total += bucket
        if shell:
            assert total == 3 * 50 * 2**30 + 2**40, "the operator's sizes replace the defaults"
        else:
            assert f": {total // 2**30} GiB with the defaults" in comment


def fake_mc(tmp_path: Path, alias_failures: int) -> tuple[dict[str, str], Path]:
    """A PATH whose `mc` logs its arguments and fails its first `alias_failures` `alias` calls (MinIO
    not up yet), and whose `sleep` only logs; and the log."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(f"""#!/bin/sh
echo "mc $*" >> {calls}
if [ "$1" = alias ] && [ "$(grep -c '^mc alias' {calls})" -le {alias_failures} ]; then
  echo "mc: Unable to initialize new alias: connection refused" >&2
  exit 1
fi
""")
    (bin_dir / "sleep").write_text(f"#!/bin/sh\necho \"sleep $*\" >> {calls}\n")
    for tool in ("mc", "sleep"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}, calls


def run_bucket_service(tmp_path: Path, alias_failures: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bucket = fleet_compose()["services"]["bucket"]
    assert bucket["entrypoint"][:2] == ["sh", "-c"]
    script = compose_script(bucket["entrypoint"][2])
    path, calls = fake_mc(tmp_path, alias_failures)
    env = {k: interpolate(str(v), {}) for k, v in bucket["environment"].items()} | path
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    return done, calls.read_text().splitlines()


def test_fleet_compose_bucket_service_waits_for_minio_then_creates_the_bucket(tmp_path: Path) -> None:
    """Runs the bucket service's script, with a stand-in `mc`, as its container would."""
    done, calls = run_bucket_service(tmp_path, alias_failures=2)
    assert done.returncode == 0, done.stderr
    alias = "mc alias set fleet http://minio:9000 mirror change-this-password"
    assert calls == [alias, "sleep 1", alias, "sleep 1", alias, "mc mb --ignore-existing fleet/mirror"]


def test_fleet_compose_bucket_service_gives_up_after_a_minute(tmp_path: Path) -> None:
    done, calls = run_bucket_service(tmp_path, alias_failures=1000)
    assert done.returncode != 0
    assert "cannot create bucket mirror at http://minio:9000" in done.stderr
    assert calls.count("sleep 1") == 59 and not any(c.startswith("mc mb") for c in calls)


def test_haproxy_checks_the_fleet_config() -> None:
    haproxy = require_binary("haproxy")
    done = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "fleet" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # The replicas' names resolve only inside compose; anything else haproxy warns about is a mistake.
    warnings = [line for line in done.stderr.splitlines()
                if "WARNING" in line and "could not resolve address" not in line]
    assert not warnings, warnings


# -- Grafana dashboard --------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "mirror.json").read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = all_panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        assert all(t["expr"].strip() for t in panel["targets"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_has_the_panels_operators_decide_with() -> None:
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard()["panels"]))
    for wanted in ("hit ratio (requests)", "hit ratio (bytes)", "bytes served: cache vs upstream", "bytes saved",
                   "pulls saved", "upstream requests by status", "rate limit remaining", "stale",
                   "in-flight and coalesced", "cache size against its cap", "evictions", "latency p50 / p99",
                   "digest mismatches", "hit ratio per replica (requests)", "hit ratio per replica (bytes)",
                   "bytes served per replica by source", "upstream fetches per replica", "replicas up",
                   "cache size per replica"):
        assert wanted in titles, wanted


def test_every_dashboard_series_is_filtered_by_the_instance_variable() -> None:
    """All (`.*`) keeps every replica; a selection narrows every panel, the Fleet row's included."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    instance = variables["instance"]
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            selectors = re.findall(r"\b(mirror_\w+|up)\b(\{[^}]*\})?", target["expr"])
            assert selectors, panel["title"]
            for name, matchers in selectors:
                assert 'instance=~"$instance"' in matchers, f"{panel['title']}: {name}{matchers}"


def test_dashboard_fleet_row_shows_each_replica_and_the_fleet() -> None:
    panels = dashboard()["panels"]
    row = panels[-1]
    assert row["type"] == "row" and row["title"].startswith("Fleet") and row["collapsed"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels[:-1])
    assert row["gridPos"]["y"] == bottom and all(p["gridPos"]["y"] > bottom for p in row["panels"])
    by_title = {p["title"]: p for p in row["panels"]}
    for title in ("Hit ratio per replica (requests)", "Hit ratio per replica (bytes)", "Upstream fetches per replica"):
        per_replica, fleet = (t["expr"] for t in by_title[title]["targets"])
        assert "sum by (instance)" in per_replica and "by (instance)" not in fleet, title
        assert per_replica.replace("sum by (instance) ", "sum") == fleet, title
    assert "once fleet-wide" in by_title["Upstream fetches per replica"]["description"]
    (job,) = [c["job_name"] for c in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]]
    assert f'up{{job="{job}"' in by_title["Replicas up"]["targets"][0]["expr"]


# -- Kubernetes -----------------------------------------------------------------------


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(DEPLOY / "k8s" / "kustomization.yaml")
    assert isinstance(kustomization, dict)
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def check_mirror_pod(sts: dict, objects: dict, tmp_path: Path):  # type: ignore[no-untyped-def,type-arg]
    """The checks every mirror StatefulSet passes (probes, non-root, its own claim, a config its
    container reads, whose data directory is the claim and whose shutdown fits the grace period);
    its mirror configuration."""
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map = objects[f"ConfigMap/{volumes['config']['configMap']['name']}"]
    config_path = container["args"][container["args"].index("--config") + 1]
    assert Path(config_path).parent == Path(mounts["config"])
    cfg = load_mirror_toml(config_map["data"][Path(config_path).name], tmp_path)
    assert cfg.server.data_dir == mounts[claim["metadata"]["name"]]
    assert pod["spec"]["terminationGracePeriodSeconds"] > cfg.server.shutdown_timeout
    return cfg


def test_k8s_statefulset_probes_storage_scraping_resources(tmp_path: Path) -> None:
    objects = k8s_objects()
    sts = objects["StatefulSet/mirror"]
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert objects[f"Service/{sts['spec']['serviceName']}"]["spec"]["clusterIP"] == "None"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/port"] == str(ports["http"]) == "5000"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    cfg = check_mirror_pod(sts, objects, tmp_path)
    assert cfg.host_port[1] == ports["http"]


def test_k8s_service_reaches_the_pods() -> None:
    objects = k8s_objects()
    pod_labels = objects["StatefulSet/mirror"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/mirror", "Service/mirror-headless"):
        service = objects[name]["spec"]
        assert service["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in service["ports"]] == ["http"]


FLEET = DEPLOY / "fleet"


def fleet_kustomization() -> dict:
    doc = load_yaml(FLEET / "kustomization.yaml")
    assert isinstance(doc, dict)
    return doc


def fleet_k8s_objects() -> dict[str, dict]:
    objects = {}
    for resource in fleet_kustomization()["resources"]:
        for doc in yaml.safe_load_all((FLEET / resource).read_text()):
            assert doc["apiVersion"] and doc["metadata"]["name"], resource
            objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_fleet_k8s_kustomization_lists_every_manifest_and_generates_haproxy_cfg() -> None:
    kustomization = fleet_kustomization()
    files = {f"k8s/{p.name}" for p in (FLEET / "k8s").glob("*.yaml")}
    assert set(kustomization["resources"]) == files
    (generator,) = kustomization["configMapGenerator"]
    (source,) = generator["files"]
    # the very file compose runs, not a copy; kustomize reads nothing above the kustomization's directory
    assert (FLEET / source).resolve() == FLEET / "haproxy.cfg"
    assert FLEET / source == (FLEET / source).resolve()
    haproxy = fleet_k8s_objects()["Deployment/mirror-haproxy"]["spec"]["template"]
    volumes = {v["name"]: v for v in haproxy["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == generator["name"]
    (container,) = haproxy["spec"]["containers"]
    assert container["image"] == "haproxy:2.6"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/usr/local/etc/haproxy"  # the image reads haproxy.cfg there
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 5000}
    assert re.search(r"^\s*bind :5000\b", (FLEET / "haproxy.cfg").read_text(), re.MULTILINE)


def test_fleet_k8s_statefulset_has_three_replicas_with_their_own_volumes(tmp_path: Path) -> None:
    objects = fleet_k8s_objects()
    sts = objects["StatefulSet/mirror"]
    assert sts["spec"]["replicas"] == len(haproxy_servers()) == 3
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    headless = objects[f"Service/{sts['spec']['serviceName']}"]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= pod["metadata"]["labels"].items()
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    cfg = check_mirror_pod(sts, objects, tmp_path)
    assert cfg.host_port[1] == 5000
    client = objects["Service/mirror-fleet"]["spec"]
    haproxy_labels = objects["Deployment/mirror-haproxy"]["spec"]["template"]["metadata"]["labels"]
    assert client["type"] == "ClusterIP" and client["selector"].items() <= haproxy_labels.items()
    assert not client["selector"].items() <= pod["metadata"]["labels"].items(), "clients go through haproxy"


def test_fleet_k8s_init_container_copies_the_shared_secret_once(tmp_path: Path) -> None:
    """Runs the initContainer's script, its paths moved under tmp_path, as the pod would."""
    pod = fleet_k8s_objects()["StatefulSet/mirror"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    assert init["image"] == container["image"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    (secret_volume,) = [name for name, v in volumes.items() if "secret" in v]
    assert volumes[secret_volume]["secret"]["secretName"] == "mirror-fleet-secret"
    data_dir = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["data"]
    assert mounts["data"] == data_dir
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    fleet_dir, data = tmp_path / "fleet", tmp_path / "data"
    fleet_dir.mkdir(), data.mkdir()
    assert mounts[secret_volume] in script and data_dir in script
    script = script.replace(mounts[secret_volume], str(fleet_dir)).replace(data_dir, str(data))
    shared = bytes(range(32))
    (fleet_dir / "secret").write_bytes(shared)
    (fleet_dir / "secret").chmod(0o440)
    for _ in range(2):  # the second start finds the copy and keeps it
        subprocess.run(["sh", "-c", script], check=True, timeout=10)
        assert data_dir_secret(data) == shared  # the mirror accepts it: 32 bytes, mode 0600
        assert (data / "secret").stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in data.iterdir()) == ["secret"]
    own = bytes(32)
    (data / "secret").write_bytes(own)
    subprocess.run(["sh", "-c", script], check=True, timeout=10)
    assert (data / "secret").read_bytes() == own, "a replica's existing secret is never replaced"


def test_fleet_k8s_haproxy_servers_are_the_statefulset_pods() -> None:
    objects = fleet_k8s_objects()
    sts = objects["StatefulSet/mirror"]
    (container,) = objects["Deployment/mirror-haproxy"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    hosts = [env[variable]["value"] for _, variable, _ in haproxy_servers()]
    pods = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}.$(POD_NAMESPACE).svc.cluster.local"
            for i in range(sts["spec"]["replicas"])]
    assert hosts == pods  # in order: every haproxy builds the same ring
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAMESPACE") == 0  # defined before the values that refer to it


def test_fleet_k8s_replicas_share_the_bucket_with_keys_from_the_secret(tmp_path: Path) -> None:
    """The StatefulSet's environment, with stand-ins for the Secret's values, is accepted by
    `mirror.config.load` with the ConfigMap's file, as the pods would load it."""
    objects = fleet_k8s_objects()
    pod = objects["StatefulSet/mirror"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    env, from_secret = {}, {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            from_secret[entry["name"]] = (ref["name"], ref["key"])
            env[entry["name"]] = f"stand-in-for-{ref['key']}"
    assert env["MIRROR_STORAGE_BACKEND"] == "s3"
    assert from_secret == {"MIRROR_STORAGE_S3_ACCESS_KEY_ID": ("mirror-fleet-s3", "access_key_id"),
                           "MIRROR_STORAGE_S3_SECRET_ACCESS_KEY": ("mirror-fleet-s3", "secret_access_key")}
    assert "Secret/mirror-fleet-s3" not in objects, "created by hand, like mirror-fleet-secret"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    config_map = objects[f"ConfigMap/{volumes['config']['configMap']['name']}"]
    (tmp_path / "mirror.toml").write_text(config_map["data"][Path(config_path).name])
    assert Path(config_path).parent == Path(mounts["config"])
    cfg = configuration.load(str(tmp_path / "mirror.toml"), env=env)
    replica_settings(cfg, env)
    s3 = cfg.storage.s3
    assert cfg.storage.backend == "s3" and s3.bucket == "mirror" and s3.endpoint_url.startswith("https://")
    assert (s3.access_key_id, s3.secret_access_key) == ("stand-in-for-access_key_id", "stand-in-for-secret_access_key")


def test_fleet_readme_creates_the_secrets_the_statefulset_reads() -> None:
    pod = fleet_k8s_objects()["StatefulSet/mirror"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    wanted: dict[str, set[str]] = {}
    for entry in container["env"]:
        if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
            wanted.setdefault(ref["name"], set()).add(ref["key"])
    for volume in pod["volumes"]:
        if "secret" in volume:
            wanted.setdefault(volume["secret"]["secretName"], set()).add("secret")
    created = {}
    for text in ((FLEET / "README.md").read_text(), (FLEET / "kustomization.yaml").read_text()):
        commands = re.findall(r"kubectl create secret generic (\S+)((?: --from-file=\S+)+)", text)
        assert {name for name, _ in commands} == set(wanted), text[:80]
        for name, files in commands:
            created[name] = {f.split("=", 1)[1] for f in files.split()}
    assert created == wanted


# -- systemd ---------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / "mirror.service").read_text())
    return parser


def test_systemd_unit_is_hardened() -> None:
    service = unit()["Service"]
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "mirror"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    args = shlex.split(service["ExecStart"])
    assert args[1] == "serve" and args[args.index("--data-dir") + 1] == "/var/lib/mirror"
    assert args[args.index("--config") + 1] == "/etc/mirror/mirror.toml"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    text = (DEPLOY / "systemd" / "mirror.service").read_text()
    binary = shlex.split(unit()["Service"]["ExecStart"])[0]
    installed = Path(sys.executable).parent / "mirror"  # this venv's entry point stands in for /opt/mirror's
    assert installed.exists()
    copy = tmp_path / "mirror.service"
    copy.write_text(text.replace(binary, str(installed)))
    done = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # warnings (unknown keys, bad values) do not change the exit status: there must be none
    problems = [line for line in done.stderr.splitlines() if "mirror.service" in line]
    assert problems == []


# -- clients ----------------------------------------------------------------------------


def test_client_files_are_what_mirror_config_generates() -> None:
    clients = DEPLOY / "clients"
    for name, text in clientconfig.containerd(CLIENT_URL, CLIENT_REGISTRIES).items():
        assert (clients / "containerd" / "certs.d" / name).read_text() == text
    assert sorted(p.name for p in (clients / "containerd" / "certs.d").iterdir()) == sorted(CLIENT_REGISTRIES)
    for name, text in clientconfig.podman(CLIENT_URL, CLIENT_REGISTRIES).items():
        assert (clients / "podman" / name).read_text() == text
    files, _ = clientconfig.docker(CLIENT_URL)
    assert (clients / "docker" / "daemon.json").read_text() == files["daemon.json"]


def test_client_files_parse() -> None:
    clients = DEPLOY / "clients"
    daemon = json.loads((clients / "docker" / "daemon.json").read_text())
    assert daemon["registry-mirrors"] == [CLIENT_URL]
    for registry in CLIENT_REGISTRIES:
        hosts = tomllib.loads((clients / "containerd" / "certs.d" / registry / "hosts.toml").read_text())
        assert CLIENT_URL in hosts["host"]
    containerd = tomllib.loads((clients / "containerd" / "config.toml").read_text())
    assert containerd["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
    podman = tomllib.loads((clients / "podman" / "registries.conf").read_text())
    assert [r["prefix"] for r in podman["registry"]] == CLIENT_REGISTRIES


def test_gitlab_runner_example_uses_the_mirror() -> None:
    runner = tomllib.loads((DEPLOY / "clients" / "gitlab-runner" / "config.toml").read_text())
    (entry,) = runner["runners"]
    assert entry["executor"] == "docker" and "image" in entry["docker"]
    pipeline = load_yaml(DEPLOY / "clients" / "gitlab-runner" / ".gitlab-ci.yml")
    assert isinstance(pipeline, dict)
    dind = pipeline["build"]["services"][0]
    assert f"--registry-mirror={CLIENT_URL}" in dind["command"]
    host = urlsplit(CLIENT_URL).netloc
    assert pipeline["tool-from-ghcr"]["image"].startswith(f"{host}/ghcr.io/")
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", pipeline["test"]["image"])
