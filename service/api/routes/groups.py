"""/v1/indexes/{name}/groups: which group of training records contributed most to each example."""

from __future__ import annotations

from fastapi import APIRouter

from indexer import groups
from service.api.deps import Reader, ServicesDep
from service.core.problems import Problem
from service.schemas.common import PROBLEM_RESPONSES
from service.schemas.groups import GroupScore, GroupsRequest, GroupsResponse, GroupsResult
from service.topk import examples_arrays
from worker.kinds.common import examples_for_index

router = APIRouter(prefix="/v1/indexes", tags=["indexes"], responses=PROBLEM_RESPONSES)


@router.post("/{name}/groups", response_model=GroupsResponse)
def score_groups(name: str, body: GroupsRequest, services: ServicesDep, who: Reader
                 ) -> GroupsResponse:
    """Score named groups (id lists, labels, metadata values) — or every value of ``by`` — for
    each example, and rank them. Runs in the thread pool: featurization blocks."""
    batcher = services.indexes.batcher(who.tenant, name)  # 404 for another tenant's index
    index, limit = batcher.index, services.settings.max_topk_examples
    if len(body.examples.x) > limit:
        raise Problem(422, "invalid-request", f"{len(body.examples.x)} examples exceed the limit "
                      f"of {limit} per request; split the batch")
    specs = None if body.groups is None else [
        groups.GroupSpec(g.name, None if g.ids is None else tuple(g.ids), g.label, g.field,
                         g.value) for g in body.groups]
    found = groups.resolve(index, specs, body.by)  # bad groups: IndexerError → 422
    examples = examples_for_index(index, *examples_arrays(body.examples.x, body.examples.y))
    scored = groups.score(index, batcher.featurize(examples, body.measurement), found,
                          body.pooling)
    results = [GroupsResult(groups=[GroupScore(**g) for g in scored.ranked(j, body.k)])
               for j in range(len(body.examples.x))]
    return GroupsResponse(index=index.name, version=index.version,
                          method=index.manifest["method"]["name"], pooling=scored.pooling,
                          results=results)
