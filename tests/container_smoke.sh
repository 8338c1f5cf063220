#!/usr/bin/env bash
# Container smoke test (not part of the default test run).
#
# Builds the image with the project's own Dockerfile using podman, runs it with a FILE configuration
# (bootstrap `app_conf:`) against PostgreSQL and Redis on the host, and calls the API through it:
# /healthz, /readyz, the image's HEALTHCHECK, a real appKey from `python im_backend.py appkey`
# (run inside the container), publish a post, read it back, reject a bad appKey.
#
#   sudo bash tests/container_smoke.sh
#
# Needs root and the Debian packages: podman runc debootstrap (to make the base image when no
# registry is reachable), postgresql-15 and redis-server (only when no servers are given).
#
#   bash tests/container_smoke.sh --debian-mirror    # only print the Debian mirror debootstrap would use
#
# Environment (all optional):
#   SMOKE_BASE_IMAGE  base image for the build (default: a local Debian bookworm + python3 image,
#                     made once with debootstrap and cached as localhost/python:3.11-slim-local;
#                     set it to python:3.11-slim when a registry is reachable)
#   SMOKE_DEBIAN_MIRROR  the Debian mirror for debootstrap (default: the first main-archive URI of this
#                     host's apt sources; this repository names no package host of its own)
#   SMOKE_APT_SOURCES the apt source files read for that (default: /etc/apt/sources.list and
#                     /etc/apt/sources.list.d/*.list, *.sources)
#   SMOKE_IMAGE       tag of the image built here (default localhost/im_backend:smoke)
#   SMOKE_NO_BUILD=1  use SMOKE_IMAGE as it is
#   SMOKE_APP_PORT    host port the app listens on (host network; default 58181)
#   SMOKE_WORKERS     IM_WORKERS in the container (default 2)
#   SMOKE_PG_HOST/SMOKE_PG_PORT/SMOKE_PG_USER/SMOKE_PG_PASSWORD/SMOKE_PG_DB
#                     an existing PostgreSQL (the database must exist); default: start one
#   SMOKE_REDIS_ADDR/SMOKE_REDIS_PASSWORD
#                     an existing Redis (host:port); default: start one
#   SMOKE_KEEP=1      leave the container, servers and temp dir behind (for debugging)
#   PODMAN            podman command (default: podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PODMAN=${PODMAN:-podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs}
RUN_OPTS=(--network=host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
LOCAL_BASE=localhost/python:3.11-slim-local
BASE_IMAGE=${SMOKE_BASE_IMAGE:-$LOCAL_BASE}
IMAGE=${SMOKE_IMAGE:-localhost/im_backend:smoke}
APP_PORT=${SMOKE_APP_PORT:-58181}
WORKERS=${SMOKE_WORKERS:-2}
PG_PORT_DEFAULT=55432
REDIS_PORT_DEFAULT=56379
SVC=smoke
SECRET=Sm0keTestSecret1            # 16 bytes: AES-128
NAME=im-smoke-$$
HOST_PY=${HOST_PY:-python3}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "missing '$1' (apt-get install $2)"; }

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND once a second until it succeeds; bounded.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
    sleep 1
  done
}

# debian_mirror: $SMOKE_DEBIAN_MIRROR, or the first enabled `deb` URI of the host's apt sources whose suite is a
# release (not -security / -updates / -backports), in one-line (sources.list) or deb822 (.sources) format.
debian_mirror() {
  if [ -n "${SMOKE_DEBIAN_MIRROR:-}" ]; then echo "$SMOKE_DEBIAN_MIRROR"; return; fi
  local files
  files=${SMOKE_APT_SOURCES:-$(echo /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)}
  # shellcheck disable=SC2086
  "$HOST_PY" - $files <<'PY'
import pathlib, re, sys

def one_line(text):
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            yield line[1], [line[2]]

def deb822(text):
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split()

for name in sys.argv[1:]:
    path = pathlib.Path(name)
    if not path.is_file():
        continue
    entries = deb822(path.read_text()) if path.suffix == ".sources" else one_line(path.read_text())
    for uri, suites in entries:
        if uri.startswith(("http://", "https://")) and any("-" not in suite and "/" not in suite for suite in suites):
            print(uri.rstrip("/"))
            sys.exit(0)
sys.exit(1)
PY
}

if [ "${1:-}" = --debian-mirror ]; then
  debian_mirror || die "no Debian mirror in the apt sources (${SMOKE_APT_SOURCES:-/etc/apt}); set SMOKE_DEBIAN_MIRROR"
  exit 0
fi

need podman podman
need "$HOST_PY" python3
[ -x /usr/sbin/runc ] || [[ "$PODMAN" != *"/usr/sbin/runc"* ]] || die "missing /usr/sbin/runc (apt-get install runc)"

TMP=$(mktemp -d /tmp/im-smoke.XXXXXX)
chmod 755 "$TMP"
PG_STARTED=""; REDIS_STARTED=""

cleanup() {
  local rc=$?
  if [ "${SMOKE_KEEP:-}" = 1 ]; then
    log "SMOKE_KEEP=1: leaving container $NAME, servers and $TMP"
    exit $rc
  fi
  if [ $rc -ne 0 ] && $PODMAN container exists "$NAME" 2>/dev/null; then
    log "container log (last 60 lines):"; $PODMAN logs --tail 60 "$NAME" >&2 2>&1 || true
  fi
  $PODMAN rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
  if [ -n "$REDIS_STARTED" ] && [ -f "$TMP/redis/redis.pid" ]; then
    kill "$(cat "$TMP/redis/redis.pid")" 2>/dev/null || true
  fi
  if [ -n "$PG_STARTED" ]; then
    timeout 30 runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$TMP/pg/data" -m fast -w stop \
      >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. base image: a registry's python:3.11-slim, or a local Debian one (made once, then cached) ---
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! $PODMAN image exists "$LOCAL_BASE"; then
  need debootstrap debootstrap
  ROOTFS=${SMOKE_ROOTFS:-/var/tmp/im-smoke/rootfs}
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    MIRROR=$(debian_mirror) || die "no Debian mirror in this host's apt sources; set SMOKE_DEBIAN_MIRROR"
    log "debootstrap bookworm (python3, python3-venv) from $MIRROR into $ROOTFS ..."
    rm -rf "$ROOTFS"; mkdir -p "$(dirname "$ROOTFS")"
    timeout 1200 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,tzdata \
      bookworm "$ROOTFS" "$MIRROR" >"$TMP/debootstrap.log" 2>&1 \
      || { tail -20 "$TMP/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  fi
  log "importing $ROOTFS as $LOCAL_BASE"
  tar -C "$ROOTFS" -c . | timeout 600 $PODMAN import --quiet \
    --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV=LANG=C.UTF-8' --change 'CMD=["python3"]' - "$LOCAL_BASE" >/dev/null
fi

# --- 2. the image, built with the project's Dockerfile ---
if [ "${SMOKE_NO_BUILD:-}" != 1 ]; then
  build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  # pip inside the build: this machine's CA bundle, and its index when it has one configured
  if [ -f "$CA_BUNDLE" ]; then
    build_args+=(--volume "$CA_BUNDLE:/etc/ssl/certs/host-ca-bundle.crt:ro"
                 --build-arg "PIP_CA_CERT=/etc/ssl/certs/host-ca-bundle.crt")
  fi
  index=${PIP_INDEX_URL:-$("$HOST_PY" -m pip config get global.index-url 2>/dev/null || true)}
  case "$index" in http://*|https://*) build_args+=(--build-arg "PIP_INDEX=$index") ;; esac
  log "building $IMAGE from $ROOT/Dockerfile (base $BASE_IMAGE) ..."
  timeout 1800 $PODMAN build --format docker "${RUN_OPTS[@]}" "${build_args[@]}" \
      -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" >"$TMP/build.log" 2>&1 \
    || { tail -40 "$TMP/build.log" >&2; die "podman build failed (log above)"; }
fi
$PODMAN image exists "$IMAGE" || die "no image $IMAGE"
[ "$($PODMAN image inspect "$IMAGE" --format '{{.Config.User}}')" = im ] || die "image does not run as user im"

# --- 3. PostgreSQL and Redis on the host ---
if [ -n "${SMOKE_PG_HOST:-}" ]; then
  PG_HOST=$SMOKE_PG_HOST; PG_PORT=${SMOKE_PG_PORT:-5432}; PG_USER=${SMOKE_PG_USER:-postgres}
  PG_PASSWORD=${SMOKE_PG_PASSWORD:-}; PG_DB=${SMOKE_PG_DB:-postgres}
else
  PGBIN=/usr/lib/postgresql/15/bin
  [ -x "$PGBIN/initdb" ] || die "no PostgreSQL 15 (apt-get install postgresql-15, or give SMOKE_PG_HOST)"
  PG_HOST=127.0.0.1; PG_PORT=$PG_PORT_DEFAULT; PG_USER=im; PG_PASSWORD=pg-smoke-pw; PG_DB=imdb
  mkdir -p "$TMP/pg"; chown postgres: "$TMP/pg"
  printf '%s\n' "$PG_PASSWORD" >"$TMP/pg/pw"; chown postgres: "$TMP/pg/pw"
  log "starting PostgreSQL 15 on 127.0.0.1:$PG_PORT"
  runuser -u postgres -- "$PGBIN/initdb" -D "$TMP/pg/data" -U "$PG_USER" --pwfile="$TMP/pg/pw" \
    --auth=scram-sha-256 -E UTF8 >"$TMP/pg/initdb.log" 2>&1 || { cat "$TMP/pg/initdb.log" >&2; die "initdb failed"; }
  PG_STARTED=1
  timeout 60 runuser -u postgres -- "$PGBIN/pg_ctl" -D "$TMP/pg/data" -l "$TMP/pg/server.log" -w -t 50 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $TMP/pg" start >/dev/null \
    || { cat "$TMP/pg/server.log" >&2; die "PostgreSQL did not start"; }
  PGPASSWORD=$PG_PASSWORD timeout 30 "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres \
    -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $PG_DB" || die "cannot create database $PG_DB"
fi
if [ -n "${SMOKE_REDIS_ADDR:-}" ]; then
  REDIS_ADDR=$SMOKE_REDIS_ADDR; REDIS_PASSWORD=${SMOKE_REDIS_PASSWORD:-}
else
  need redis-server redis-server
  REDIS_ADDR=127.0.0.1:$REDIS_PORT_DEFAULT; REDIS_PASSWORD=redis-smoke-pw
  mkdir -p "$TMP/redis"
  log "starting Redis on $REDIS_ADDR"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT_DEFAULT" --requirepass "$REDIS_PASSWORD" --save '' \
    --appendonly no --dir "$TMP/redis" --daemonize yes --pidfile "$TMP/redis/redis.pid" \
    --logfile "$TMP/redis/redis.log" || die "redis-server did not start"
  REDIS_STARTED=1
  wait_for 20 "Redis" env REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT_DEFAULT" ping \
    || die "Redis not answering"
fi

# --- 4. the FILE configuration, mounted read-only at /data/config ---
CONF=$TMP/config
mkdir -p "$CONF"
cat >"$CONF/config.yaml" <<EOF
# bootstrap: the application configuration is the file next to this one
app_conf: app_conf.yaml
EOF
cat >"$CONF/app_conf.yaml" <<EOF
svc:
  - name: "$SVC"
    secret: "$SECRET"
db: {host: "$PG_HOST", user: "$PG_USER", password: "$PG_PASSWORD", dbname: "$PG_DB", port: $PG_PORT}
cache: {addr: "$REDIS_ADDR", password: "$REDIS_PASSWORD", post_expire: 604800, comment_expire: 604800,
        postlike_expire: 300, commentlike_expire: 300}
clean: {commentbatch: 30, postlikebatch: 30, commentlikebatch: 30}
EOF
chmod 755 "$CONF"; chmod 644 "$CONF"/*.yaml

# --- 5. run the container ---
log "running $IMAGE as $NAME on 127.0.0.1:$APP_PORT (IM_WORKERS=$WORKERS)"
$PODMAN run -d --name "$NAME" "${RUN_OPTS[@]}" \
  -e IM_PORT="$APP_PORT" -e IM_WORKERS="$WORKERS" \
  -v "$CONF:/data/config:ro" "$IMAGE" >/dev/null 2>"$TMP/run.err" \
  || { cat "$TMP/run.err" >&2; die "podman run failed"; }
# (without systemd podman cannot schedule the healthcheck timer and says so in run.err; it is run by hand below)

BASE=http://127.0.0.1:$APP_PORT
http_ok() { "$HOST_PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$1"; }
running() { [ "$($PODMAN inspect "$NAME" --format '{{.State.Running}}')" = true ]; }
deadline=$((SECONDS + 90))
until http_ok "$BASE/healthz" 2>/dev/null; do
  running || die "the container exited (status $($PODMAN inspect "$NAME" --format '{{.State.ExitCode}}'))"
  ((SECONDS < deadline)) || die "no answer from $BASE/healthz within 90 s"
  sleep 1
done
log "healthz answers"

# the image's own HEALTHCHECK (python stdlib) must pass
timeout 30 $PODMAN healthcheck run "$NAME" || die "the image HEALTHCHECK failed"
log "HEALTHCHECK passes"

uid=$($PODMAN exec "$NAME" id -u) && [ "$uid" != 0 ] || die "the app runs as root"
log "runs as uid $uid"

appkey() { timeout 30 $PODMAN exec "$NAME" python im_backend.py appkey --svc "$SVC" --conf /data/config/config.yaml; }
KEY1=$(appkey) || die "'python im_backend.py appkey' failed in the container"
[[ "$KEY1" =~ ^[0-9a-f]{34,}$ ]] || die "appkey printed '$KEY1'"

# --- 6. the API through the container ---
"$HOST_PY" - "$BASE" "$SVC" "$KEY1" <<'PY' || die "API checks failed"
import json, sys, time, urllib.error, urllib.parse, urllib.request

base, svc, key = sys.argv[1:4]

def call(method, path, query=None, form=None, expect=200):
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    doc = json.loads(body)
    assert status == expect, f"{method} {path}: HTTP {status} (want {expect}): {doc}"
    assert set(doc) == {"code", "msg", "data"}, f"{method} {path}: not an envelope: {doc}"
    print(f"  {method} {path} -> {status} {doc['msg']}", file=sys.stderr)
    return doc

# readiness: PostgreSQL and Redis reachable from inside the container (bounded)
deadline = time.monotonic() + 30
while True:
    try:
        call("GET", "/readyz")
        break
    except AssertionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)

auth = {"svc": svc, "appKey": key}
title, content, author = "smoke title", "hello from the container smoke test \u4f60\u597d", "smoke-user"
doc = call("POST", "/api/v1/posts/publish", auth,
           {"author": author, "title": title, "content": content, "extra": json.dumps({"image": "x.png"})})
assert doc["code"] == 200, doc
post_id = doc["data"]["post_id"]
assert isinstance(post_id, int) and post_id > 0, doc

doc = call("GET", "/api/v1/posts/getinfo", {**auth, "post_id": post_id})
post = doc["data"]["post"]
assert post["id"] == post_id, post
assert post["content"] == content, post
assert post["title"] == title, post
assert post["author"] == author, post
assert post["svc"] == svc, post
assert post["extra"] == {"image": "x.png"}, post

doc = call("GET", "/api/v1/posts/getlist", {**auth, "limit": 5})
assert post_id in doc["data"]["post_list"], doc

# a bad appKey is refused with 400 "bind authentication", an unknown path with 404
doc = call("GET", "/api/v1/posts/getinfo", {"svc": svc, "appKey": "00" * 32, "post_id": post_id}, expect=400)
assert doc["msg"] == "bind authentication", doc
call("GET", "/no/such/path", auth, expect=404)
print(f"  post {post_id} published and read back", file=sys.stderr)
PY

# --- 7. workers: IM_WORKERS reached uvicorn ---
if [ "$WORKERS" -gt 1 ]; then
  n=$($PODMAN exec "$NAME" python -c 'import glob, os; me = "/proc/%d/cmdline" % os.getpid(); print(sum(1 for p in glob.glob("/proc/[0-9]*/cmdline") if p != me and b"spawn_main" in open(p, "rb").read()))' 2>/dev/null || echo 0)
  [ "$n" -ge "$WORKERS" ] || die "expected $WORKERS worker processes, found $n"
  log "$n worker processes"
fi

# --- 8. a clean stop on SIGTERM ---
timeout 60 $PODMAN stop -t 30 "$NAME" >/dev/null 2>>"$TMP/run.err" || die "podman stop failed"
code=$($PODMAN inspect "$NAME" --format '{{.State.ExitCode}}')
log "stopped, exit code $code"
case "$code" in 0|143) ;; *) die "unclean exit code $code on SIGTERM" ;; esac

log "PASS"
