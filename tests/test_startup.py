"""Start-up failures and the command line: one log line per cause, exit status 3 however the server is run,
retries summarised; `appkey` errors are one line and exit status 2."""
import socket
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT, SECRET, Server, app_config, eventually, svc_name

EXIT_STARTUP_FAILED = 3


def failed_start(srv: Server, how: str) -> tuple[int, str]:
    """Start srv with uvicorn (`uvicorn im_backend:app`) or the CLI (`python im_backend.py`, "workers": with
    --workers 2); its exit status and log."""
    if how == "uvicorn":
        srv.start(wait=False)
    else:
        workers = ["--workers", "2"] if how == "workers" else []
        with open(srv.log_path, "wb") as log_file:
            srv.process = subprocess.Popen([sys.executable, str(ROOT / "im_backend.py"), "-conf", str(srv.boot),
                                            "--host", "127.0.0.1", "--port", str(srv.port), *workers],
                                           cwd=srv.directory,
                                           stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return srv.process.wait(60), srv.log()


def only_line(log: str, text: str) -> str:
    lines = [line for line in log.splitlines() if text in line]
    assert len(lines) == 1, log
    return lines[0]


@pytest.mark.parametrize("how", ["uvicorn", "cli", "workers"])
def test_refused_database_one_waiting_line_one_error_exit_3(make_server, backing, how):
    config = app_config(backing, {svc_name("x"): SECRET}, server={"startup_wait": 1.5})
    config["db"].update(host="127.0.0.1", port=1)  # nothing listens: connection refused, retried
    status, log = failed_start(make_server(f"refused-{how}", config, start=False), how)
    assert status == EXIT_STARTUP_FAILED, log
    if how == "workers":  # each worker tried; the first to give up stopped the others
        assert "cannot connect to PostgreSQL at 127.0.0.1:1" in log and "Traceback" not in log
        return
    only_line(log, "waiting up to 1.5 s for PostgreSQL at 127.0.0.1:1")
    error = only_line(log, "cannot connect to PostgreSQL at 127.0.0.1:1")
    assert "ERROR" in error and "cannot start" in error and "gave up after" in error
    assert "retrying" not in log and "Traceback" not in log


def test_unreachable_database_times_out_within_startup_wait(make_server, backing):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        config = app_config(backing, {svc_name("x"): SECRET}, server={"startup_wait": 1})
        config["db"].update(host="127.0.0.1", port=silent.getsockname()[1])
        status, log = failed_start(make_server("silent-db", config, start=False), "uvicorn")
    assert status == EXIT_STARTUP_FAILED, log  # one attempt, given the whole startup_wait
    assert "no answer within 1 s" in only_line(log, "cannot connect to PostgreSQL")
    assert "Traceback" not in log


def test_refusing_database_is_final_at_once(make_server, backing):
    config = app_config(backing, {svc_name("x"): SECRET})
    config["db"].update(dbname="no_such_database")
    status, log = failed_start(make_server("no-database-once", config, start=False), "cli")
    assert status == EXIT_STARTUP_FAILED, log
    assert "does not exist" in only_line(log, "cannot connect to PostgreSQL")
    assert "waiting" not in log and "gave up" not in log


@pytest.mark.parametrize("how", ["uvicorn", "cli"])
def test_bad_secret_in_configuration_names_the_service(make_server, backing, how):
    config = app_config(backing, {"bad_secret_svc": "abc"})
    status, log = failed_start(make_server(f"bad-secret-{how}", config, start=False), how)
    assert status == EXIT_STARTUP_FAILED, log
    line = only_line(log, "the secret of service 'bad_secret_svc' must be 16, 24 or 32 bytes long")
    assert "cannot start" in line and "Traceback" not in log


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "im_backend.py"), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("secret", ["abc", "x" * 17, "é" * 8 + "x"])  # 3, 17 and 17 bytes
def test_appkey_with_a_bad_secret_is_one_line_and_exit_2(secret):
    result = run_cli("appkey", "--secret", secret)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "must be 16, 24 or 32 bytes" in result.stderr


def test_appkey_from_a_configuration_with_a_bad_secret_names_the_service(workdir):
    directory = workdir / "appkey-bad-conf"
    directory.mkdir(exist_ok=True)
    (directory / "boot.yaml").write_text("app_conf: app.yaml\n")
    (directory / "app.yaml").write_text("svc:\n  - name: short_one\n    secret: abc\n")
    result = run_cli("appkey", "--svc", "short_one", "-conf", str(directory / "boot.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the secret of service 'short_one' must be 16, 24 or 32 bytes" in result.stderr


async def test_reload_with_a_bad_secret_names_the_service_and_keeps_serving(make_server, backing):
    from conftest import authenticates

    good = svc_name("rs")
    srv = make_server("reload-bad-secret", app_config(backing, {good: SECRET}))
    srv.write_config(app_config(backing, {good: SECRET, "bad_secret_svc": "abc"}))
    assert await eventually(lambda: "rejected the new configuration" in srv.log(), timeout=10)
    assert "the secret of service 'bad_secret_svc' must be 16, 24 or 32 bytes" in srv.log()
    assert await authenticates(srv.url, good)


async def test_start_on_first_request_failure_is_a_503_and_one_log_line(make_server, backing, caplog):
    import im_backend

    config = app_config(backing, {svc_name("x"): SECRET}, server={"startup_wait": 0})
    config["db"].update(host="127.0.0.1", port=1)
    srv = make_server("no-lifespan-no-db", config, start=False)  # files only; the app runs in this process
    inner = im_backend.create_app(srv.boot)
    transport = httpx.ASGITransport(app=inner)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"code": 503, "msg": "service unavailable",
                                                               "data": None})
    errors = [r for r in caplog.records if r.name == "im_backend" and r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot start: cannot connect to PostgreSQL at 127.0.0.1:1" in errors[0].getMessage()
    assert inner.service is None
