"""Request size and rate limits.

* :class:`BodyLimit` — pure ASGI middleware: refuses a body over the limit with 413 before the
  app reads it (by ``Content-Length``, and by counting bytes for chunked bodies). Uploads
  (``PUT /v1/files/...``) have their own, larger limit.
* :class:`RateLimiter` — a token bucket per API key in Redis (one Lua call per request), so the
  limit holds across API processes.
"""

from __future__ import annotations

import json
import time

import redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.errors import PROBLEM_BASE


def _too_large(limit: int, path: str) -> tuple[dict, bytes]:
    body = {
        "type": PROBLEM_BASE + "body-too-large",
        "title": "Content Too Large",
        "status": 413,
        "detail": f"the request body exceeds the limit of {limit} bytes; send fewer examples "
        "per request (or upload large files with PUT /v1/files/...)",
        "instance": path,
    }
    return body, json.dumps(body).encode()


class BodyLimit:
    """ASGI middleware enforcing a maximum request body size (413 problem+json)."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int,
                 upload_prefix: str = "/v1/files/") -> None:
        self.app, self.max_bytes, self.upload_bytes = app, max_bytes, upload_bytes
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.upload_bytes if path.startswith(self.upload_prefix) else self.max_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = limit + 1
            if declared > limit:
                if declared <= DRAIN_BYTES:
                    await _drain(receive, declared)
                await self._reject(send, limit, path)
                return
        seen = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            # Past the limit the app is told the client left; whatever it answers is replaced.
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_BYTES)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._reject(send, limit, path)

    @staticmethod
    async def _reject(send: Send, limit: int, path: str) -> None:
        _, payload = _too_large(limit, path)
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/problem+json"),
                        (b"content-length", str(len(payload)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": payload})


DRAIN_BYTES = 64 << 20


async def _drain(receive: Receive, most: int) -> None:
    """Read and discard up to ``most`` bytes of a refused body, so the client, still sending,
    reads the 413 instead of a connection reset (beyond that, the connection is closed)."""
    read = 0
    while read <= min(most, DRAIN_BYTES):
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


# KEYS[1] bucket; ARGV[1] rate per second, ARGV[2] burst, ARGV[3] now. Returns
# {allowed (1/0), seconds to wait}.
_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    """Token bucket per key: ``per_minute`` sustained, ``burst`` at once; 0 disables it."""

    def __init__(self, client: redis.Redis, prefix: str, per_minute: int, burst: int):
        self.per_second = per_minute / 60.0
        self.burst = burst
        self.prefix = prefix
        self._script = client.register_script(_BUCKET) if per_minute > 0 else None

    def allow(self, key_id: str) -> tuple[bool, float]:
        """``(allowed, seconds until the next request would be)``."""
        if self._script is None:
            return True, 0.0
        allowed, wait = self._script(
            keys=[f"{self.prefix}ratelimit:{key_id}"],
            args=[self.per_second, self.burst, repr(time.time())],
        )
        return bool(int(allowed)), float(wait)
