"""/v1/provenance: where an LLM output comes from — verbatim spans plus gradient attribution."""

from __future__ import annotations

from fastapi import APIRouter, Response

from indexer.provenance import ProvenanceOptions, read_takedown, takedown_files, trace
from service.api.deps import Reader, ServicesDep
from service.core.problems import Problem
from service.jobs import submit
from service.remote import model_parameters
from service.schemas.common import PROBLEM_RESPONSES
from service.schemas.jobs import ProvenanceJob
from service.schemas.provenance import (
    ProvenanceItem,
    ProvenanceOptionsIn,
    ProvenanceParams,
    ProvenanceRequest,
    ProvenanceResponse,
)

router = APIRouter(prefix="/v1/provenance", tags=["provenance"], responses=PROBLEM_RESPONSES)
OPTION_FIELDS = tuple(ProvenanceOptionsIn.model_fields)


@router.post("", response_model=ProvenanceResponse,
             responses={202: {"model": ProvenanceResponse,
                              "description": "Spans now; attribution queued as a job (Location)"}})
def provenance(body: ProvenanceRequest, response: Response, services: ServicesDep,
               who: Reader) -> dict:
    """Verbatim spans of the output in the corpus, the top-k documents by attribution to
    log p(output | prompt), and both merged per document.

    Span matching always answers now. Attribution runs inline for models up to
    ``TDA_API_QUERY_MAX_PARAMETERS`` parameters; for larger ones a ``provenance`` job is queued
    (needs the ``submit`` scope): the answer is ``202`` with the job's ``Location``.
    """
    index = services.indexes.get(who.tenant, body.index)
    settings = services.settings
    options = ProvenanceOptions(**body.model_dump(include=set(OPTION_FIELDS)))
    takedown = read_takedown(takedown_files(settings.data_dir, settings.tenant_dir(who.tenant)))
    inline = model_parameters(index.manifest) <= settings.api_query_max_parameters
    answer = trace(index, body.prompt, body.output, options, takedown,
                   attribution=body.attribution and inline)
    if not body.attribution:
        answer["attribution"] = {"status": "skipped", "reason": "attribution=false"}
    elif not inline:
        if "submit" not in who.scopes:
            raise Problem(403, "forbidden", "this model is too large to attribute inline; its "
                          "attribution runs as a job, which needs an API key with 'submit'")
        params = ProvenanceParams(index=body.index, items=[ProvenanceItem(
            prompt=body.prompt, output=body.output)], **options.__dict__)
        job, _ = submit(services, who, ProvenanceJob(kind="provenance", params=params), None)
        location = f"/v1/jobs/{job.id}"
        answer["attribution"] = {"status": "queued", "job_id": job.id, "location": location,
                                 "reason": "the model exceeds TDA_API_QUERY_MAX_PARAMETERS"}
        response.status_code = 202
        response.headers["Location"] = location
    return answer
