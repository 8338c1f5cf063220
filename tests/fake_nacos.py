"""A fake Nacos 2.x/3.x server for tests, speaking the real gRPC protocol (the subset the SDKs use).

Protocol notes (as implemented by Nacos and expected by nacos-sdk-python 3.2.0, module ``v2.nacos``):

* Clients are configured with the *HTTP* address ``ip:PORT`` and open gRPC on ``PORT + 1000``
  (``GRPCConfig.port_offset``, default ``Constants.GRPC_PORT_OFFSET = 1000``).  So a test gives the SDK
  ``FakeNacos.port`` and the fake's gRPC server listens on ``FakeNacos.grpc_port == port + 1000``.
  The HTTP port itself is only used by the SDK for the login call when username/password are set
  (``POST /nacos/v1/auth/users/login?username=..&password=..``); the fake serves that minimally.
* Every message is a ``Payload{metadata{type, clientIp, headers}, body: Any{value: JSON bytes}}``;
  ``type`` is the simple class name of the request/response (``ConfigQueryRequest``, ...).
* Unary service ``/Request/request``: ``ServerCheckRequest`` (no connection needed; answers the connection
  id), then ``HealthCheckRequest``, ``ConfigQueryRequest``, ``ConfigBatchListenRequest``,
  ``ConfigPublishRequest``, ``ConfigRemoveRequest``.  Requests from a peer that has not set up its
  bi-stream get ``ErrorResponse`` errorCode 301 (UN_REGISTER), as in real Nacos, which makes the SDK
  reconnect.
* Bi-directional stream ``/BiRequestStream/requestBiStream``: the client's first message is
  ``ConnectionSetupRequest``; the server may answer with ``SetupAckRequest`` (ability negotiation);
  the server pushes ``ConfigChangeNotifyRequest`` / ``ClientDetectionRequest``, the client acks each
  with a response payload on the same stream.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import secrets
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as PbAny
from v2.nacos.transport.grpcauto import nacos_grpc_service_pb2_grpc as pb_grpc
from v2.nacos.transport.grpcauto.nacos_grpc_service_pb2 import Metadata, Payload

GRPC_PORT_OFFSET = 1000
UN_REGISTER = 301
NO_HANDLER = 302
CONFIG_NOT_FOUND = 300
NO_RIGHT = 403


def md5_hex(content: str) -> str:
    """Nacos' config md5 (empty string for empty/absent content)."""
    return hashlib.md5(content.encode("utf-8")).hexdigest() if content else ""


def make_payload(type_name: str, body: dict[str, Any]) -> Payload:
    return Payload(metadata=Metadata(type=type_name, clientIp="127.0.0.1"),
                   body=PbAny(value=json.dumps(body).encode("utf-8")))


def ok(type_name: str, request_id: str = "", **fields: Any) -> Payload:
    return make_payload(type_name, {"resultCode": 200, "errorCode": 0, "message": "",
                                    "requestId": request_id, **fields})


def fail(type_name: str, error_code: int, message: str, request_id: str = "", **fields: Any) -> Payload:
    return make_payload(type_name, {"resultCode": 500, "errorCode": error_code, "message": message,
                                    "requestId": request_id, **fields})


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports() -> int:
    """A port P such that P (HTTP) and P + 1000 (gRPC) are both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + GRPC_PORT_OFFSET < 65536 and _port_free(port) and _port_free(port + GRPC_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class _Conn:
    conn_id: str
    peer: str
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    listening: set[tuple[str, str, str]] = field(default_factory=set)
    labels: dict[str, str] = field(default_factory=dict)


class FakeNacos:
    """In-process Nacos: ``await start()``, configure the SDK with ``127.0.0.1:port``, ``publish()`` configs.

    The config store survives ``stop()``/``start()`` (like a real Nacos backed by a DB); connections and
    listener registrations do not.  ``requests_seen`` lists, in order, the type names of unary requests
    (``ConfigQueryRequest`` ...), of messages received on bi-streams (``ConnectionSetupRequest`` and the
    clients' acks such as ``NotifySubscriberResponse``), and ``"HTTP <METHOD> <path>"`` for HTTP calls.
    """

    def __init__(self, port: int = 0, *, username: str | None = None, password: str | None = None,
                 ability_negotiation: bool = True) -> None:
        self.port: int = port or pick_ports()
        self.username, self.password = username, password
        self.ability_negotiation = ability_negotiation
        self.requests_seen: list[str] = []
        self.configs: dict[tuple[str, str, str], str] = {}
        self.conns: dict[str, _Conn] = {}           # peer -> connection (after ConnectionSetupRequest)
        self._checked: dict[str, str] = {}          # peer -> connection id given by ServerCheckRequest
        self._tokens: set[str] = set()
        self._ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._http: asyncio.AbstractServer | None = None
        self._http_writers: set[asyncio.StreamWriter] = set()

    @property
    def grpc_port(self) -> int:
        return self.port + GRPC_PORT_OFFSET

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._server is not None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_RequestServicer_to_server(_Unary(self), server)
        pb_grpc.add_BiRequestStreamServicer_to_server(_BiStream(self), server)
        if server.add_insecure_port(f"127.0.0.1:{self.grpc_port}") != self.grpc_port:
            raise RuntimeError(f"fake nacos: cannot bind gRPC port {self.grpc_port}")
        await server.start()
        self._server = server
        self._http = await asyncio.start_server(self._http_handle, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        """Close both ports and drop every connection (clients see their streams break)."""
        server, self._server = self._server, None
        if self._http is not None:
            self._http.close()
            for writer in list(self._http_writers):
                writer.close()
            await self._http.wait_closed()
            self._http = None
        if server is not None:
            await server.stop(grace=None)
            await server.wait_for_termination(timeout=5)
        self.conns.clear()
        self._checked.clear()

    async def __aenter__(self) -> "FakeNacos":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ test API
    def publish(self, data_id: str, group: str, content: str, tenant: str = "") -> None:
        """Set a config and push ConfigChangeNotifyRequest to every connection listening to it."""
        key = (data_id, group, self._tenant(tenant))
        self.configs[key] = content
        self._notify(key)

    def remove(self, data_id: str, group: str, tenant: str = "") -> None:
        key = (data_id, group, self._tenant(tenant))
        self.configs.pop(key, None)
        self._notify(key)

    def listeners(self, data_id: str, group: str, tenant: str = "") -> int:
        key = (data_id, group, self._tenant(tenant))
        return sum(key in conn.listening for conn in self.conns.values())

    def detect_clients(self) -> None:
        """Push a ClientDetectionRequest to every connected client (they must ack it)."""
        for conn in self.conns.values():
            conn.outbox.put_nowait(make_payload("ClientDetectionRequest", self._server_request_body()))

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _tenant(tenant: str | None) -> str:
        return "" if tenant in (None, "public") else tenant

    def _server_request_body(self, **fields: Any) -> dict[str, Any]:
        return {"requestId": str(next(self._ids)), "headers": {}, "module": "internal", **fields}

    def _notify(self, key: tuple[str, str, str]) -> None:
        data_id, group, tenant = key
        for conn in self.conns.values():
            if key in conn.listening:
                body = self._server_request_body(dataId=data_id, group=group, tenant=tenant, module="config")
                conn.outbox.put_nowait(make_payload("ConfigChangeNotifyRequest", body))

    def _authorized(self, headers: dict[str, str]) -> bool:
        return not self.username or headers.get("accessToken") in self._tokens

    def handle_unary(self, payload: Payload, peer: str) -> Payload:
        rtype = payload.metadata.type
        self.requests_seen.append(rtype)
        try:
            body = json.loads(payload.body.value or b"{}")
        except ValueError:
            return fail("ErrorResponse", 500, "bad json body")
        rid = body.get("requestId", "")
        if rtype == "ServerCheckRequest":
            conn_id = f"{int(time.time() * 1000)}_{peer.replace('ipv4:', '').replace(':', '_')}"
            self._checked[peer] = conn_id
            return ok("ServerCheckResponse", rid, connectionId=conn_id,
                      supportAbilityNegotiation=self.ability_negotiation)
        conn = self.conns.get(peer)
        if conn is None:
            return fail("ErrorResponse", UN_REGISTER, "Connection is unregistered.", rid)
        if rtype == "HealthCheckRequest":
            return ok("HealthCheckResponse", rid)
        if not rtype.startswith("Config"):
            return fail("ErrorResponse", NO_HANDLER, "RequestHandler Not Found", rid)
        if not self._authorized(dict(payload.metadata.headers) | body.get("headers", {})):
            return fail("ErrorResponse", NO_RIGHT, "user not found!", rid)
        key = (body.get("dataId") or "", body.get("group") or "", self._tenant(body.get("tenant")))
        if rtype == "ConfigQueryRequest":
            if key not in self.configs:
                return fail("ConfigQueryResponse", CONFIG_NOT_FOUND, "config data not exist", rid)
            content = self.configs[key]
            return ok("ConfigQueryResponse", rid, content=content, md5=md5_hex(content), contentType="text",
                      encryptedDataKey="", lastModified=int(time.time() * 1000), isBeta=False, tag=False)
        if rtype == "ConfigBatchListenRequest":
            changed = []
            for ctx in body.get("configListenContexts", []):
                ckey = (ctx.get("dataId", ""), ctx.get("group", ""), self._tenant(ctx.get("tenant")))
                if not body.get("listen", True):
                    conn.listening.discard(ckey)
                    continue
                conn.listening.add(ckey)
                if ctx.get("md5", "") != md5_hex(self.configs.get(ckey, "")):
                    changed.append({"dataId": ckey[0], "group": ckey[1], "tenant": ckey[2]})
            return ok("ConfigChangeBatchListenResponse", rid, changedConfigs=changed)
        if rtype == "ConfigPublishRequest":
            self.configs[key] = body.get("content") or ""
            self._notify(key)
            return ok("ConfigPublishResponse", rid)
        if rtype == "ConfigRemoveRequest":
            self.configs.pop(key, None)
            self._notify(key)
            return ok("ConfigRemoveResponse", rid)
        return fail("ErrorResponse", NO_HANDLER, "RequestHandler Not Found", rid)

    async def _http_handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Minimal HTTP/1.1: only POST /nacos/v1/auth/users/login (one request per connection)."""
        self._http_writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            url = urllib.parse.urlsplit(target)
            params = dict(urllib.parse.parse_qsl(url.query)) | dict(urllib.parse.parse_qsl(body.decode()))
            self.requests_seen.append(f"HTTP {method} {url.path}")
            if url.path.rstrip("/") in ("/nacos/v1/auth/users/login", "/nacos/v1/auth/login") and method == "POST":
                if self.username and (params.get("username"), params.get("password")) != (self.username,
                                                                                         self.password):
                    status, out = "403 Forbidden", b"unknown user!"
                else:
                    token = secrets.token_hex(16)
                    self._tokens.add(token)
                    status = "200 OK"
                    out = json.dumps({"accessToken": token, "tokenTtl": 18000, "globalAdmin": False}).encode()
            else:
                status, out = "404 Not Found", b"not found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(out)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + out)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, ConnectionError):
            pass
        finally:
            self._http_writers.discard(writer)
            writer.close()


class _Unary(pb_grpc.RequestServicer):
    def __init__(self, fake: FakeNacos) -> None:
        self.fake = fake

    async def request(self, request: Payload, context: grpc.aio.ServicerContext) -> Payload:
        return self.fake.handle_unary(request, context.peer())


class _BiStream(pb_grpc.BiRequestStreamServicer):
    def __init__(self, fake: FakeNacos) -> None:
        self.fake = fake

    async def requestBiStream(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802
        fake, peer = self.fake, context.peer()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.metadata.type != "ConnectionSetupRequest":
            return
        fake.requests_seen.append("ConnectionSetupRequest")
        setup = json.loads(first.body.value or b"{}")
        conn = _Conn(conn_id=fake._checked.get(peer, peer), peer=peer, labels=setup.get("labels") or {})
        fake.conns[peer] = conn
        if fake.ability_negotiation:
            conn.outbox.put_nowait(make_payload("SetupAckRequest", fake._server_request_body(abilityTable={})))

        async def read_acks() -> None:
            async for payload in request_iterator:
                fake.requests_seen.append(payload.metadata.type)

        reader = asyncio.ensure_future(read_acks())
        getter: asyncio.Future | None = None
        try:
            while not reader.done():
                getter = getter or asyncio.ensure_future(conn.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    payload, getter = getter.result(), None
                    await context.write(payload)
        finally:
            for task in (reader, getter):
                if task is not None:
                    task.cancel()
            if fake.conns.get(peer) is conn:
                del fake.conns[peer]
