"""The `fastapi` peer: IM-Backend's `getinfo` written the way most Python teams would write it.

FastAPI + pydantic response models, a dependency that checks the appKey with pycryptodome on every request
(no cache of decryptions), the same Redis cache-aside read (same key, same cached JSON) with an asyncpg
fallback, same tables. Only GET /api/v1/posts/getinfo exists. It reads the same configuration as IM-Backend:
IM_CONF points at the bootstrap file whose `app_conf:` names the application YAML.

    IM_CONF=boot.yaml uvicorn fastapi_getinfo:app --app-dir bench/peers --no-access-log --log-level warning
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Optional
from zoneinfo import ZoneInfo

import asyncpg
import redis.asyncio as aioredis
import yaml
from Crypto.Cipher import AES
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel


def load_config() -> dict:
    boot_path = pathlib.Path(os.environ.get("IM_CONF", "configs/config.yaml"))
    boot = yaml.safe_load(boot_path.read_text())
    return yaml.safe_load((boot_path.parent / boot["app_conf"]).read_text())


CONFIG = load_config()
SECRETS = {s["name"]: s["secret"] for s in CONFIG["svc"]}
ZONE = ZoneInfo("Asia/Shanghai")
POST_TTL = int(CONFIG.get("cache", {}).get("post_expire", 604800))


class Post(BaseModel):
    id: int
    title: str
    content: str
    author: str
    time: str
    svc: str
    extra: Optional[dict[str, Any]] = None


class PostData(BaseModel):
    post: Post


class PostEnvelope(BaseModel):
    code: int = 200
    msg: str = "success"
    data: PostData


class ApiError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        self.code, self.msg = code, msg


@asynccontextmanager
async def lifespan(app: FastAPI):
    db = CONFIG["db"]
    app.state.pool = await asyncpg.create_pool(host=db["host"], port=db.get("port", 5432), user=db["user"],
                                               password=db.get("password") or None, database=db["dbname"],
                                               min_size=2, max_size=10)
    addr = CONFIG["cache"]["addr"]
    if addr.startswith("unix://"):
        app.state.redis = aioredis.Redis(unix_socket_path=addr[len("unix://"):])
    else:
        host, _, port = addr.rpartition(":")
        app.state.redis = aioredis.Redis(host=host, port=int(port))
    yield
    await app.state.pool.close()
    await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.exception_handler(ApiError)
async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"code": exc.code, "msg": exc.msg, "data": None}, status_code=min(exc.code, 500))


def check_appkey(svc: str, appkey: str) -> str:
    secret = SECRETS.get(svc)
    if secret is None:
        raise ApiError(400, "bind authentication")
    try:
        raw = bytes.fromhex(appkey)
        cipher = AES.new(secret.encode(), AES.MODE_CFB, iv=raw[:16], segment_size=128)
        plain = cipher.decrypt(raw[16:]).decode()
        if not re.fullmatch(r"-?[0-9]{1,19}", plain) or abs(time.time() - int(plain)) > 10:
            raise ValueError(plain)
    except ValueError:
        raise ApiError(400, "bind authentication") from None
    return svc


# The dependency is `async def` (it does no I/O, so it runs on the event loop). Many teams write it as a plain
# `def`, which FastAPI runs in a worker thread for every request; FASTAPI_SYNC_DEPENDENCY=1 measures that variant.
if os.environ.get("FASTAPI_SYNC_DEPENDENCY") == "1":
    def verify_appkey(svc: str = Query(...), appKey: str = Query(...)) -> str:
        return check_appkey(svc, appKey)
else:
    async def verify_appkey(svc: str = Query(...), appKey: str = Query(...)) -> str:
        return check_appkey(svc, appKey)


@app.get("/api/v1/posts/getinfo", response_model=PostEnvelope)
async def getinfo(request: Request, post_id: int = Query(..., ge=0), svc: str = Depends(verify_appkey)):
    key = f"svc:{svc}:post:{post_id}:info"
    cached = await request.app.state.redis.get(key)
    if cached is not None:
        post = Post(**json.loads(cached))
    else:
        row = await request.app.state.pool.fetchrow(
            f'SELECT id, title, content, author, extra, created_at FROM "{svc}_post_info" WHERE id = $1', post_id)
        if row is None:
            raise ApiError(10006, "find data failed")
        created: datetime = row["created_at"]
        post = Post(id=row["id"], title=row["title"] or "", content=row["content"] or "", author=row["author"] or "",
                    time=created.astimezone(ZONE).strftime("%Y-%m-%dT%H:%M:%S"), svc=svc,
                    extra=json.loads(row["extra"]) if row["extra"] else None)
        await request.app.state.redis.set(key, post.model_dump_json(), ex=POST_TTL)
    return PostEnvelope(data=PostData(post=post))
