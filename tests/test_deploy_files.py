"""docker-compose.yaml, the Dockerfile and their configuration files agree with each other and with the app.
(No container engine runs here; tests/container_smoke.sh builds and runs the image with podman.)"""
import os
import re
import subprocess

import yaml

import im_backend
from conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_four_services_and_the_init_step():
    assert {"postgres", "redis", "nacos", "nacos-init", "app"} <= set(SERVICES)
    depends = SERVICES["app"]["depends_on"]
    assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
    assert depends["nacos-init"]["condition"] == "service_completed_successfully"
    for name in ("postgres", "redis", "nacos", "app"):
        assert "healthcheck" in SERVICES[name], name


def test_every_bind_mount_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_app_configuration_matches_the_other_services():
    mount = next(v for v in SERVICES["app"]["volumes"] if v.endswith(":/data/config"))
    boot = im_backend.read_bootstrap(ROOT / mount.split(":")[0] / "config.yaml")
    init_env = SERVICES["nacos-init"]["environment"]
    assert (boot["ipaddr"], int(boot["port"])) == ("nacos", 8848)
    assert (boot["namespaceid"], boot["group"], boot["dataid"]) == (
        init_env["NACOS_NAMESPACE"], init_env["NACOS_GROUP"], init_env["NACOS_DATA_ID"])
    assert (boot["username"], boot["password"]) == (init_env["NACOS_USERNAME"], init_env["NACOS_PASSWORD"])
    published = next(v for v in SERVICES["nacos-init"]["volumes"] if v.endswith(":/init/app_conf.yaml:ro"))
    config = im_backend.parse_app_config((ROOT / published.split(":")[0]).read_text())
    pg_env = SERVICES["postgres"]["environment"]
    assert (config.db.host, config.db.port) == ("postgres", 5432)
    assert (config.db.user, config.db.password, config.db.dbname) == (
        pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"], pg_env["POSTGRES_DB"])
    redis_command = SERVICES["redis"]["command"]
    assert config.cache.addr == "redis:6379"
    assert config.cache.password == redis_command[redis_command.index("--requirepass") + 1]
    assert config.services  # at least one calling service


def test_dockerfile_runs_what_the_compose_file_expects():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "EXPOSE 8181" in dockerfile and "HEALTHCHECK" in dockerfile
    user = re.search(r"^USER (\S+)", dockerfile, re.M)
    assert user and user.group(1) not in ("root", "0")
    assert '"-conf", "/data/config/config.yaml"' in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    ports = SERVICES["app"]["ports"]
    assert any(p.endswith(":8181") for p in ports)
    assert "IM_WORKERS" in SERVICES["app"]["environment"]


def test_requirements_pin_every_package():
    for name in ("requirements.txt", "requirements-runtime.txt", "constraints.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), f"{name}: {line}"


def test_container_smoke_takes_its_debian_mirror_from_the_hosts_apt_sources(tmp_path):
    """tests/container_smoke.sh names no package host: debootstrap's mirror comes from apt's sources or a variable."""
    script = ROOT / "tests" / "container_smoke.sh"
    assert not re.findall(r"https?://(?!127\.0\.0\.1|localhost)[\w.-]+", script.read_text())
    one_line = tmp_path / "sources.list"
    one_line.write_text("# deb http://commented.invalid/debian bookworm main\n"
                        "deb-src http://source.invalid/debian bookworm main\n"
                        "deb [signed-by=/k.gpg] http://mirror.invalid/debian-security bookworm-security main\n"
                        "deb [arch=amd64] http://mirror.invalid/debian/ bookworm main contrib\n")
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nEnabled: no\n\n"
                      "Types: deb deb-src\nURIs: https://other.invalid/debian\n  https://third.invalid/debian\n"
                      "Suites: trixie-updates\n  trixie\nComponents: main\n")

    def mirror(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), "--debian-mirror"], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "SMOKE_DEBIAN_MIRROR": "", **env}, stdin=subprocess.DEVNULL)
    assert mirror(SMOKE_APT_SOURCES=str(one_line)).stdout == "http://mirror.invalid/debian\n"
    assert mirror(SMOKE_APT_SOURCES=str(deb822)).stdout == "https://other.invalid/debian\n"
    none = mirror(SMOKE_APT_SOURCES=str(tmp_path / "missing"))
    assert none.returncode != 0 and "set SMOKE_DEBIAN_MIRROR" in none.stderr
    assert mirror(SMOKE_DEBIAN_MIRROR="http://given.invalid/d").stdout == "http://given.invalid/d\n"


def test_the_optional_standby_follows_the_primary_and_the_app_can_read_from_it():
    standby, primary = SERVICES["postgres-standby"], SERVICES["postgres"]
    assert standby["profiles"] == ["standby"]  # not started by a plain `docker compose up`
    assert standby["image"] == primary["image"]  # a standby runs the primary's major version
    assert standby["depends_on"]["postgres"]["condition"] == "service_healthy"
    script = standby["command"][0]
    assert "pg_basebackup -h postgres -U " + primary["environment"]["POSTGRES_USER"] in script and " -R " in script
    assert standby["environment"]["PGPASSWORD"] == primary["environment"]["POSTGRES_PASSWORD"]
    hba = next(v for v in primary["volumes"] if "docker-entrypoint-initdb.d" in v).split(":")[0]
    assert "host replication all all" in (ROOT / hba).read_text()
    assert "pg-standby-data" in COMPOSE["volumes"] and "healthcheck" in standby
    # the commented `replicas:` of the app configuration, uncommented, names this standby
    text = (ROOT / "configs/app_conf.compose.yaml").read_text()
    line = next(line for line in text.splitlines() if "replicas:" in line)
    text = text.replace('port: 5432}\n', 'port: 5432,\n', 1).replace(line, "    " + line.lstrip(" #"))
    config = im_backend.parse_app_config(text)
    assert [(r.host, r.port) for r in config.db.replicas] == [("postgres-standby", 5432)]
