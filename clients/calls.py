"""The table of calls: every method of `Client` and `AsyncClient`, described once.

Each row names the RPC, the function that builds its request from the method's typed arguments
(`requests`; its signature is the method's) and the one that converts the response (`convert`).
A method's docstring is its row's `doc`, if any, then the build function's. The two clients make
their methods from these rows (see `rpc` and `transport`).
"""

from __future__ import annotations

from memserve.clients import convert, requests
from memserve.clients.rpc import fold, paged, stream, unary, upload
from memserve.v1.evaluation_pb2_grpc import EvaluationServiceStub as Evaluations
from memserve.v1.generation_pb2_grpc import GenerationServiceStub as Generation
from memserve.v1.jobs_pb2_grpc import JobServiceStub as Jobs
from memserve.v1.memory_pb2_grpc import MemoryServiceStub as Memories

STUBS = (Generation, Memories, Jobs, Evaluations)
"""The services the calls use, one stub each per client."""

GENERATE = "Generates a completion of `prompt` and returns it whole."
GENERATE_STREAM = """Generates a completion of `prompt` and streams it: one chunk per decoded token
(text may lag a token while a character or a possible stop sequence is incomplete). The first chunk
has the seed and the memories used, the last the finish reason and the usage. Stopping early
(closing the generator) frees the server's slot."""
REGISTER_DOCUMENTS = """Queues the training of document bank `bank`: a new version with these
documents added to its current ones (an id it has already replaces that document's text). Follow
the returned job with `watch_job`."""
REGISTER_FACTS = """Queues the training of local memory set `memory_set`: a new version with these
facts added to its current ones (a fact id it has already replaces that fact). Follow the returned
job with `watch_job`."""
EVALUATE = """Runs a memory's evaluation on the server's model and engine: progress while it runs
(`EvaluationProgress`), then the report's files (`ReportFile`). Closing the generator cancels it."""
REGISTER_ADAPTER = """Queues the training of adapter `name` (a new version, trained afresh) on
documents, question/answer templates, or both, with the causal-LM loss. Follow the returned job
with `watch_job`."""


class Calls:
    """The calls of the memserve API (mixed into `Client` and `AsyncClient`)."""

    # --- generation ---
    generate = unary(Generation, "Generate", requests.build_request, convert.completion, doc=GENERATE)
    generate_stream = stream(
        Generation,
        "GenerateStream",
        requests.build_request,
        convert.chunk,
        first=convert.first_chunk,
        doc=GENERATE_STREAM,
    )
    model_info = unary(Generation, "GetModelInfo", requests.model_info, convert.model_info)

    # --- memories ---
    get_memory = unary(Memories, "GetMemory", requests.get_memory, convert.memory_info)
    list_memories = paged(Memories, "ListMemories", requests.list_memories, convert.memory_page)
    delete_memory = unary(Memories, "DeleteMemory", requests.delete_memory, convert.deleted_versions)
    export_memory = fold(Memories, "ExportMemory", requests.export_memory, convert.chunk_data)
    export_memory_to = fold(Memories, "ExportMemory", requests.export_memory_to, convert.chunk_data)
    put_memory = upload(Memories, "PutMemory", requests.put_memory, convert.memory_info)
    import_memory = upload(Memories, "PutMemory", requests.import_memory, convert.memory_info)
    register_documents = unary(
        Memories,
        "RegisterDocuments",
        requests.build_documents_request,
        convert.job_info,
        doc=REGISTER_DOCUMENTS,
    )
    register_facts = unary(
        Memories, "RegisterFacts", requests.build_facts_request, convert.job_info, doc=REGISTER_FACTS
    )
    register_adapter = unary(
        Memories, "RegisterAdapter", requests.build_adapter_request, convert.job_info, doc=REGISTER_ADAPTER
    )

    # --- jobs ---
    get_job = unary(Jobs, "GetJob", requests.get_job, convert.job_info)
    list_jobs = paged(Jobs, "ListJobs", requests.list_jobs, convert.job_page)
    cancel_job = unary(Jobs, "CancelJob", requests.cancel_job, convert.job_info)
    watch_job = stream(Jobs, "WatchJob", requests.watch_job, convert.job_info)
    submit_job = unary(Jobs, "SubmitJob", requests.submit_job, convert.job_info)

    # --- evaluations ---
    evaluate = stream(Evaluations, "Evaluate", requests.evaluate, convert.evaluation_event, doc=EVALUATE)
