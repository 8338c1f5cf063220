"""`bash scripts/run.sh` (scripts/embedded.py run): the configuration a user edits survives a restart."""
import json
import os
import pathlib
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

import embedded
from conftest import ROOT, SECRET, Api, authenticates, eventually, free_port

START_TIMEOUT = 120  # seconds: the first start runs initdb


class RunCommand:
    """`python scripts/embedded.py run --data DIR --port P`, what run.sh executes after the set-up.

    new_session: in a process group of its own (with the server it starts), which a test may kill whole."""

    def __init__(self, data: pathlib.Path, port: int | None = None, new_session: bool = False) -> None:
        self.data, self.port, self.new_session = data, port or free_port(), new_session
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data.parent / f"run-{self.port}-{secrets.token_hex(3)}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RunCommand":
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "embedded.py"), "run", "--data", str(self.data),
                 "--port", str(self.port)], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=self.new_session)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        async def up() -> bool:
            assert self.process.poll() is None, self.log()
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        assert await eventually(up, timeout=START_TIMEOUT, interval=0.3), self.log()

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C: the server, PostgreSQL and Redis stop; the data stay."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@pytest.fixture
def run_dir(workdir):
    """A fresh directory under the session's temporary one (the embedded PostgreSQL runs as another user there)."""
    path = workdir / f"run-script-{secrets.token_hex(3)}"
    path.mkdir()
    return path


@pytest.fixture
def run_command(run_dir):
    commands = []

    def make(data: pathlib.Path | None = None, port: int | None = None, new_session: bool = False) -> RunCommand:
        commands.append(RunCommand(data or run_dir / "data", port, new_session).start())
        return commands[-1]
    yield make
    for command in commands:
        command.stop()


async def test_a_service_added_to_app_yaml_survives_a_restart(run_command, run_dir):
    first = run_command()
    await first.wait_ready()
    app_yaml = run_dir / "data" / "app.yaml"
    demo_secret = (run_dir / "data" / "demo.secret").read_text().strip()
    # the user adds a service (and a comment) by hand, as the banner invites
    with app_yaml.open("a") as f:
        f.write("# my own note\n")
    config = yaml.safe_load(app_yaml.read_text())
    assert [s["name"] for s in config["svc"]] == ["demo"]
    text = app_yaml.read_text().replace("svc:\n", f"svc:\n- name: added\n  secret: {SECRET}\n", 1)
    app_yaml.write_text(text)
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        assert await eventually(lambda: authenticates(client, "added"), timeout=20), first.log()
        post_id = await Api(client, "added", SECRET).publish("alice", "before the restart")
    assert first.stop() == 0  # a normal end, as Ctrl-C

    second = run_command()
    await second.wait_ready()
    assert app_yaml.read_text() == text  # not rewritten: the note is still there
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as client:
        assert await authenticates(client, "added")
        assert await authenticates(client, "demo", demo_secret)
        api = Api(client, "added", SECRET)
        assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "before the restart"
    readme_walk_through_works(second)


BANNER = "IM-Backend on http://127.0.0.1:"


def demo_api(run: RunCommand, client: httpx.AsyncClient) -> Api:
    return Api(client, "demo", (run.data / "demo.secret").read_text().strip())


def postgres_stopped(data: pathlib.Path) -> bool:
    return not (data / "pg" / "postmaster.pid").exists()  # pg_ctl stop -w returns once it is gone


async def test_a_second_run_refuses_and_leaves_the_first_untouched(run_command, run_dir):
    first = run_command()
    assert await eventually(lambda: BANNER in first.log() or first.process.poll() is not None,
                            timeout=START_TIMEOUT, interval=0.1), first.log()
    # the banner comes once the server answers on its port, not before
    assert httpx.get(first.url + "/healthz", timeout=5).status_code == 200, first.log()
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        post_id = await demo_api(first, client).publish("alice", "first")

    data = (run_dir / "data").resolve()
    taken = f"already running (pid {first.process.pid}) on port {first.port} with the data in {data}"
    for second in (run_command(port=first.port), run_command()):  # the same data on the same port, on another
        assert second.process.wait(60) == 1, second.log()
        assert taken in second.log() and BANNER not in second.log(), second.log()
    with socket.socket() as holder:  # another program listens on the port asked for
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        other = run_command(data=run_dir / "other", port=holder.getsockname()[1])
        assert other.process.wait(60) == 1, other.log()
        assert f"port {other.port} is in use by another process" in other.log() and BANNER not in other.log()
        assert not (run_dir / "other" / "pg").exists()  # nothing was started

    # the first one still has its PostgreSQL, its Redis and its server
    assert first.process.poll() is None, first.log()
    ready = httpx.get(first.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["data"]["redis"] == "ok", (ready.text, first.log())
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        api = demo_api(first, client)
        await api.publish("alice", "after the second run")
        assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "first"
    assert first.stop() == 0 and postgres_stopped(data)


async def test_a_run_killed_with_kill_9_starts_again(run_command, run_dir):
    first = run_command(new_session=True)
    await first.wait_ready()
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as client:
        post_id = await demo_api(first, client).publish("alice", "before kill -9")
    os.killpg(first.process.pid, signal.SIGKILL)  # the run and its server; PostgreSQL and Redis are left over
    # (the run is not reaped yet, as after a crash whose parent has not waited for it)

    second = run_command(port=first.port)
    await second.wait_ready()
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as client:
        api = demo_api(second, client)
        assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "before kill -9"
        await api.publish("alice", "after the restart")
    assert second.stop() == 0
    # Ctrl-C stops everything, the PostgreSQL the killed run left running included
    assert postgres_stopped(run_dir / "data"), second.log()


async def test_a_server_that_outlived_its_killed_run_keeps_the_data_taken(run_command, run_dir):
    first = run_command()
    await first.wait_ready()
    server_pid = json.loads((run_dir / "data" / "run.lock").read_text())["server_pid"]
    first.process.kill()  # the run alone: its server goes on serving
    first.process.wait(10)
    second = run_command()
    assert second.process.wait(60) == 1, second.log()
    assert f"(pid {server_pid}) is still running on port {first.port}" in second.log(), second.log()
    assert httpx.get(first.url + "/readyz", timeout=5).status_code == 200  # untouched

    os.kill(server_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while embedded._pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    third = run_command()
    await third.wait_ready()
    assert third.stop() == 0 and postgres_stopped(run_dir / "data"), third.log()


def readme_walk_through_works(run: RunCommand) -> None:
    """The README's curl walk-through, pasted as it is (only the port and the data directory differ), answers
    what the README shows below each command."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Try it with curl"):]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    expected = [json.loads(line.removeprefix("# ")) for line in script.splitlines() if line.startswith("# {")]
    script = script.replace("127.0.0.1:8181", f"127.0.0.1:{run.port}").replace(".data/", f"{run.data}/")
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)  # one stream: answers in order
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(answers) == len(expected) == 13, done.stdout
    for answer, shown in zip(answers, expected):
        assert (answer["code"], answer["msg"]) == (shown["code"], shown["msg"]), (answer, shown)
        assert (answer["data"] is None) == (shown["data"] is None), (answer, shown)
        if shown["data"]:  # the same fields, with the ids and times of this run
            assert answer["data"].keys() == shown["data"].keys(), (answer, shown)


def test_an_app_yaml_of_an_earlier_run_is_kept_and_repointed_only_where_its_sockets_are_gone(tmp_path):
    import embedded

    live = tmp_path / "live.sock"
    live.touch()
    db, redis_addr = {"host": str(tmp_path), "port": 5432}, f"unix://{live}"
    app_yaml = tmp_path / "app.yaml"
    kept = "svc:\n- name: mine\n  secret: W7K8pJ3aQv2LcXgH\ndb:\n  host: /somewhere\ncache:\n  addr: unix:///elsewhere.sock\n"
    app_yaml.write_text(kept.replace("/somewhere", str(tmp_path)).replace("/elsewhere.sock", str(live)))
    embedded.write_config(tmp_path, db, redis_addr, {"demo": SECRET}, keep=True)
    assert "mine" in app_yaml.read_text() and "demo" not in app_yaml.read_text()  # untouched
    app_yaml.write_text(kept)  # an earlier run's sockets, gone now
    embedded.write_config(tmp_path, db, redis_addr, {"demo": SECRET}, keep=True)
    config = yaml.safe_load(app_yaml.read_text())
    assert [s["name"] for s in config["svc"]] == ["mine"]
    assert (config["db"]["host"], config["cache"]["addr"]) == (str(tmp_path), redis_addr)
