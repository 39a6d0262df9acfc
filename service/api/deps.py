"""Dependencies injected into routes: services, the caller (API key → tenant, scopes), limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.core.problems import Problem
from service.core.security import Principal
from service.registry import Registry
from service.state import Services

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or `X-API-Key: <key>`")


# The dependencies are ``async`` so the hot path (top-k) never hops to the thread pool; the
# blocking work in them is one key-file stat and one Redis call (sub-millisecond).
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Principal:
    """Authenticate the key and charge its rate limit (401 / 429 as problem+json)."""
    key = bearer.credentials if bearer is not None else header
    challenge = {"WWW-Authenticate": 'Bearer realm="tdaserve"'}
    if not key:
        raise Problem(401, "unauthenticated", "no API key: send 'Authorization: Bearer <key>' "
                      "or 'X-API-Key: <key>' (create one with `tda keys create`)",
                      headers=challenge)
    principal = services.keys.authenticate(key)
    if principal is None:
        raise Problem(401, "unauthenticated", "the API key is not valid (revoked or mistyped)",
                      headers=challenge)
    allowed, wait = services.limiter.allow(principal.key_id)
    if not allowed:
        retry = max(1, round(wait + 0.5))
        raise Problem(429, "rate-limited",
                      f"rate limit of {services.settings.rate_limit_per_minute} requests per "
                      f"minute exceeded; retry in {retry} s", headers={"Retry-After": str(retry)})
    return principal


def requires(scope: str) -> Callable[..., Principal]:
    """A dependency that admits keys holding ``scope``."""

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if scope not in principal.scopes:
            raise Problem(403, "forbidden", f"this API key lacks the '{scope}' scope "
                          f"(it has {sorted(principal.scopes)}); ask an admin for a key with it")
        return principal

    return check


Reader = Annotated[Principal, Depends(requires("read"))]
Submitter = Annotated[Principal, Depends(requires("submit"))]
Admin = Annotated[Principal, Depends(requires("admin"))]


def registry(services: Services, principal: Principal, kind: str) -> Registry:
    """The caller's own registry of ``kind`` (models or corpora)."""
    return Registry(services.settings.tenant_dir(principal.tenant), kind)
