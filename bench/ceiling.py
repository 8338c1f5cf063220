"""The `ceiling` of the benchmark: the least a Python ASGI app can do per request on these uvicorn settings.

A raw ASGI callable (no framework, no I/O) that answers every HTTP request with one fixed JSON envelope of the
same shape and about the same size as IM-Backend's `getinfo` answer for the benchmarked post. Whatever
IM-Backend does beyond this (routing, appKey check, Redis, PostgreSQL, JSON) shows up as the gap to it.

    uvicorn ceiling:app --app-dir bench --no-access-log --log-level warning
"""
BODY = (b'{"code":200,"msg":"success","data":{"post":{"id":7311234567890123456,"title":"benchmark post",'
        b'"content":"' + b"x" * 120 + b'","author":"bench_author","time":"2024-01-01T08:00:00",'
        b'"svc":"bench","extra":{"image":"a.png"}}}}')
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]}
RESPONSE = {"type": "http.response.body", "body": BODY}


async def app(scope, receive, send):
    if scope["type"] == "http":
        await send(START)
        await send(RESPONSE)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
