"""Python client for the tdaserve API, synchronous (:class:`Client`) and asynchronous
(:class:`AsyncClient`), with job polling.

```python
from service.client import Client
with Client("http://127.0.0.1:8000", api_key) as tda:
    hits = tda.topk("digits", x=[[...64 values...]], y=[3], k=5)
    job = tda.submit("mislabel", {"index": "digits"})
    done = tda.wait(job["id"], on_progress=print)
    rows = list(tda.result_rows(job["id"]))
```
Errors arrive as :class:`APIError` carrying the problem document (status, title, detail).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
Progress = Callable[[dict[str, Any]], None]


class APIError(Exception):
    """A problem+json error response."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        self.title = problem.get("title", "")
        self.detail = problem.get("detail", "")
        super().__init__(f"{status} {self.title}: {self.detail}")


class JobFailed(Exception):
    """A job that ended failed or cancelled while being waited for."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        error = job.get("error") or {}
        super().__init__(f"job {job['id']} {job['state']}: {error.get('detail', '')}".rstrip(": "))


def default_key(data_dir: str | Path | None = None) -> str | None:
    """``TDA_API_KEY``, else the bootstrap key `tda serve` wrote to ``{data_dir}/api-key``."""
    if os.environ.get("TDA_API_KEY"):
        return os.environ["TDA_API_KEY"]
    path = Path(data_dir or os.environ.get("TDA_DATA_DIR", ".tda")) / "api-key"
    return path.read_text().strip() if path.is_file() else None


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:500]}
        raise APIError(response.status_code, problem)
    if response.headers.get("content-type", "").startswith("application/octet-stream"):
        return response.content
    return response.json()


def _examples(x: Any, y: Any) -> dict[str, Any]:
    rows = x.tolist() if hasattr(x, "tolist") else list(x)
    body: dict[str, Any] = {"x": [list(r) for r in rows]}
    if y is not None:
        body["y"] = y.tolist() if hasattr(y, "tolist") else list(y)
    return body


def _topk_body(x: Any, y: Any, k: int, opponents: bool, measurement: str,
               text: list[str] | None = None) -> dict[str, Any]:
    examples = _examples(x if text is None else [], y)
    if text is not None:  # texts, tokenised by the server with the index's tokenizer
        examples["text"] = list(text)
        del examples["x"]
    return {"examples": examples, "k": k, "opponents": opponents, "measurement": measurement}


def _groups_body(x: Any, y: Any, groups: list[dict[str, Any]] | None, by: str | None,
                 pooling: str | None, k: int | None, measurement: str) -> dict[str, Any]:
    body = {"examples": _examples(x, y), "groups": groups, "by": by, "pooling": pooling,
            "k": k, "measurement": measurement}
    return {name: value for name, value in body.items() if value is not None}


def _job_body(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "params": params}


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Client:
    """Synchronous client (one ``httpx.Client``, keep-alive)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None):
        self.http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                 transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _check(self.http.request(method, path, **kwargs))

    # --- health and registries -----------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return self.http.get("/readyz").json()

    def upload(self, local: str | Path, remote: str) -> dict[str, Any]:
        """Upload a local file into your file area at ``remote``."""
        with open(local, "rb") as handle:
            return self.request("PUT", f"/v1/files/{remote}", content=handle,
                                headers={"Content-Type": "application/octet-stream"})

    def register(self, kind: str, name: str, path: str) -> dict[str, Any]:
        """Register a model, corpus or index (``kind``: models, corpora, indexes) by path."""
        return self.request("POST", f"/v1/{kind}", json={"name": name, "path": path})

    def list(self, kind: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/{kind}")

    # --- queries and jobs ----------------------------------------------------------------
    def topk(self, index: str, x: Any = None, y: Any = None, k: int = 10,
             opponents: bool = False, measurement: str = "output",
             text: list[str] | None = None) -> dict[str, Any]:
        """Top-k proponents (and opponents) of each example in ``x`` or ``text`` (labels ``y``)."""
        return self.request("POST", f"/v1/indexes/{index}/topk",
                            json=_topk_body(x, y, k, opponents, measurement, text))

    def groups(self, index: str, x: Any, y: Any = None, groups: list[dict[str, Any]] | None = None,
               by: str | None = None, pooling: str | None = None, k: int | None = None,
               measurement: str = "output") -> dict[str, Any]:
        """Groups of training records ranked per example: ``groups`` (dicts with ``name`` and
        ``ids``, ``label`` or ``field``/``value``) or one per value of the metadata field ``by``."""
        return self.request("POST", f"/v1/indexes/{index}/groups",
                            json=_groups_body(x, y, groups, by, pooling, k, measurement))

    def submit(self, kind: str, params: dict[str, Any], idempotency_key: str | None = None
               ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=_job_body(kind, params), headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 3600.0, interval: float = 0.5,
             on_progress: Progress | None = None, raise_on_failure: bool = True) -> dict[str, Any]:
        """Poll until the job ends; ``on_progress(job)`` on every poll."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in TERMINAL:
                if raise_on_failure and job["state"] != "succeeded":
                    raise JobFailed(job)
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(interval)

    def result(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/result",
                            params={"offset": offset, "limit": limit})

    def result_rows(self, job_id: str, page_size: int = 500) -> Iterator[dict[str, Any]]:
        """Every row of a job's result table, page by page."""
        offset = 0
        while True:
            page = self.result(job_id, offset, page_size)
            yield from page["items"]
            if page["page"]["next"] is None:
                return
            offset += page_size

    def result_array(self, job_id: str, name: str) -> Any:
        """A stored result array (e.g. ``scores``) as a NumPy array."""
        import io

        import numpy as np

        data = self.request("GET", f"/v1/jobs/{job_id}/result/arrays/{name}")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def subset_results(self, job_id: str) -> Any:
        """A finished ``subsets`` job as ``attribution.evaluate.SubsetResults`` (``.save(path)``
        writes the ``.npz`` that ``tda eval lds`` and AirRep training read)."""
        from attribution.evaluate import SubsetResults

        job = self.job(job_id)
        if job["kind"] != "subsets" or job["state"] != "succeeded":
            raise ValueError(f"job {job_id} is a {job['kind']} job that is {job['state']}; "
                             "subset results come from a succeeded 'subsets' job")
        summary = job["result"]["summary"]
        arrays = [self.result_array(job_id, n) for n in ("masks", "outputs", "losses", "subset_ids")]
        meta = {k: summary[k] for k in ("plan", "config", "n_seeds") if k in summary}
        return SubsetResults(*arrays, meta=meta)


class AsyncClient:
    """Asynchronous client with the same methods (awaitable)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, transport: httpx.AsyncBaseTransport | None = None):
        self.http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key),
                                      timeout=timeout, transport=transport)

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return _check(await self.http.request(method, path, **kwargs))

    async def topk(self, index: str, x: Any = None, y: Any = None, k: int = 10,
                   opponents: bool = False, measurement: str = "output",
                   text: list[str] | None = None) -> dict[str, Any]:
        return await self.request("POST", f"/v1/indexes/{index}/topk",
                                  json=_topk_body(x, y, k, opponents, measurement, text))

    async def groups(self, index: str, x: Any, y: Any = None,
                     groups: list[dict[str, Any]] | None = None, by: str | None = None,
                     pooling: str | None = None, k: int | None = None,
                     measurement: str = "output") -> dict[str, Any]:
        return await self.request("POST", f"/v1/indexes/{index}/groups",
                                  json=_groups_body(x, y, groups, by, pooling, k, measurement))

    async def submit(self, kind: str, params: dict[str, Any],
                     idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self.request("POST", "/v1/jobs", json=_job_body(kind, params),
                                  headers=headers)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/jobs/{job_id}")

    async def wait(self, job_id: str, timeout: float = 3600.0, interval: float = 0.5,
                   on_progress: Progress | None = None, raise_on_failure: bool = True
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in TERMINAL:
                if raise_on_failure and job["state"] != "succeeded":
                    raise JobFailed(job)
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            await asyncio.sleep(interval)

    async def result(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/result",
                                  params={"offset": offset, "limit": limit})

    async def result_rows(self, job_id: str, page_size: int = 500
                          ) -> AsyncIterator[dict[str, Any]]:
        offset = 0
        while True:
            page = await self.result(job_id, offset, page_size)
            for row in page["items"]:
                yield row
            if page["page"]["next"] is None:
                return
            offset += page_size
