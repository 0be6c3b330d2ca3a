"""The FastAPI app: REST API, the web page at /, auth, logging and error handling.

Routes: GET /health, GET /v1/model, POST /v1/reports, POST /v1/preview, GET / (the page), /static/*,
/docs and /openapi.json. With an API key every route needs `Authorization: Bearer <key>`.

Privacy: uploads stay in memory (forms.py). Logs carry the request id, method, path, status, byte counts,
image count and timings, never text fields, file names or DICOM tags; error messages name the form field,
never echo a value.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from importlib.resources import files

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import MutableHeaders

from clinicalblip.serve.batching import Batcher, Job, QueueFull, ServerClosing
from clinicalblip.serve.engine import DECODING_FIELDS, TEXT_FIELDS, ReportService
from clinicalblip.serve.forms import FormError, parse_form
from clinicalblip.serve.worker import WorkerTimeout

log = logging.getLogger("clinicalblip.serve")
STATIC = files("clinicalblip.serve") / "static"
PREVIEW_MAX_SIDE = 512
PREP_THREADS = 2
# A study whose uploads total less than this is decoded and tokenised on the event loop (well under a millisecond
# for small images): handing it to a worker thread costs more GIL time in the hop than the work itself, and that
# GIL time is taken from generation. Bigger uploads (real radiographs decode in tens of ms, and PIL releases the
# GIL while it decodes) go to the worker threads so the loop keeps serving.
INLINE_PREP_BYTES = 256 * 1024
# The page loads only its own script and style; previews are blob: URLs.
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
DOCS_CSP = "default-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com"


def _error(status: int, field: str, message: str, rid: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}, "id": rid}, status_code=status,
                        headers={"X-Request-ID": rid, **(headers or {})})


_REPORT_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "one file per view: PNG, JPEG or DICOM (limit per file: see /v1/model)"},
                "views": {"type": "array", "items": {"type": "string"},
                          "description": "optional, one per image in the same order: PA, AP, LATERAL, ..."},
                **{n: {"type": "string", "description": f"clinical context: {n}"} for n in TEXT_FIELDS},
                "template": {"type": "string", "description": "prompt template (default: the model's own)"},
                "num_beams": {"type": "integer", "minimum": 1, "default": 1},
                "max_new_tokens": {"type": "integer", "minimum": 1},
                "do_sample": {"type": "boolean", "default": False},
                "temperature": {"type": "number", "exclusiveMinimum": 0, "description": "with do_sample"},
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "with do_sample"},
                "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
                # the prior study (a model trained with data.prior; /v1/model "prior" says what it takes)
                "prior_images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "the prior study's images (frontal first)"},
                "prior_views": {"type": "array", "items": {"type": "string"}},
                "prior_report": {"type": "string", "description": "the prior study's report"},
                "prior_date": {"type": "string", "format": "date"},
                "study_date": {"type": "string", "format": "date", "description": "with prior_date: the interval"},
            }}}},
    },
    "responses": {"200": {"description": "the report", "content": {"application/json": {"example": {
        "id": "3f2a...", "report": "The heart is enlarged. No pleural effusion.", "prompt": "Indication: ...",
        "views": ["PA", "LATERAL"], "model_hash": "0123abcd4567ef89", "template": "findings_with_context",
        "decoding": {"num_beams": 1, "max_new_tokens": 96, "do_sample": False},
        "timings_ms": {"queue": 3.1, "preprocessing": 4.2, "generation": 80.5, "total": 90.0}, "batch_size": 2,
        "findings": {"labeler": "chexpert-rules", "positive": ["Cardiomegaly"], "uncertain": [],
                     "negative": ["Pleural Effusion"], "labels": {"Cardiomegaly": 1}}}}}},
        "4XX": {"description": "bad input: {error: {field, message}, id}"},
        "503": {"description": "queue full (Retry-After) or shutting down"},
        "504": {"description": "generation exceeded the time limit; the model worker was restarted"}},
}
_PREVIEW_SCHEMA = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "string", "format": "binary",
                                  "description": "one image, as in /v1/reports ('image' is accepted too)"}}}}}},
    "responses": {"200": {"description": f"PNG, long side at most {PREVIEW_MAX_SIDE} px",
                          "content": {"image/png": {}}}},
}


class Guard:
    """Pure ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware): a request id, the API key
    check, security headers, and one log line per request with what the endpoint chose to add (sizes, timings)."""

    def __init__(self, app, key: bytes | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["rid"] = rid
        t0 = time.perf_counter()
        method, path = scope["method"], scope["path"]
        if self.key is not None:
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = auth.partition(b" ")
            # compare_digest on bytes: constant time in the key's length, whatever the token is.
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                log.info("request %s %s %s 401", rid, method, path)
                response = _error(401, "authorization", "missing or wrong API key (Authorization: Bearer <key>)",
                                  rid, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        status = [0]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", DOCS_CSP if path == "/docs" else CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)
        log.info("request %s %s %s %d %.1fms%s", rid, method, path, status[0], (time.perf_counter() - t0) * 1000,
                 state.get("log_extra", ""))


def create_app(service: ReportService) -> FastAPI:
    """The app for one loaded model. The batcher thread starts and stops with the app's lifespan."""
    s = service.settings
    batcher = Batcher(service.run_batch, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue)
    key = s.api_key.encode("utf-8") if s.api_key else None
    # Two preprocessing threads, not anyio's 40: bounded memory (a 40 M-pixel upload decodes to 120 MB of RGB)
    # and fewer threads fighting the generation thread for the GIL.
    prep_limiter = anyio.CapacityLimiter(PREP_THREADS)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="clinicalblip", version=service.facts["code_version"], lifespan=lifespan,
                  description="Radiology report generation from chest radiographs and clinical context. "
                              "Research use only; not for clinical use.")
    app.state.service, app.state.batcher = service, batcher

    app.add_middleware(Guard, key=key)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        rid = getattr(request.state, "rid", "-")
        # Type only: a message could quote user input.
        log.error("request %s failed: %s", rid, type(exc).__name__,
                  exc_info=exc if os.environ.get("CLINICALBLIP_DEBUG") else None)
        return _error(500, "server", "internal error; the request id is in the server log", rid)

    @app.get("/health", summary="liveness, and whether the model is loaded")
    async def health():
        loaded = service.model_loaded
        status = "warming" if service.warming else "ok" if loaded else "degraded"
        return {"status": status, "model_loaded": loaded, "queue": len(batcher),
                "max_queue": batcher.max_queue, "generation": service.generation_info()}

    @app.get("/v1/model", summary="base, stages, template and slots, decoding defaults, limits, model card")
    async def model_info():
        return service.model_info()

    async def _read_form(request: Request, max_files: int):
        cl = request.headers.get("content-length")
        limit = max_files * s.max_file_bytes + 16 * s.max_text_bytes + 65536
        if cl and cl.isdigit() and int(cl) > limit:
            raise FormError(413, "body", f"request body of {int(cl):,} bytes is larger than the limit of {limit:,}")
        return await parse_form(request.headers.get("content-type"), request.stream(),
                                max_file_bytes=s.max_file_bytes, max_text_bytes=s.max_text_bytes,
                                max_files=max_files, max_fields=8 + len(TEXT_FIELDS) + len(DECODING_FIELDS)
                                + 2 * service.max_views + 8)

    @app.post("/v1/reports", summary="write a report for one study", openapi_extra=_REPORT_SCHEMA)
    async def reports(request: Request):
        rid = request.state.rid
        t_arrive = time.perf_counter()
        if batcher.full():  # refuse before reading megabytes of upload
            return _error(503, "queue", "the server is busy; retry later", rid, {"Retry-After": str(s.retry_after_s)})
        try:
            form = await _read_form(request, max_files=service.max_views + 1
                                    + getattr(service.front, "max_prior_views", 0))
            request.state.log_extra = f" in={form.nbytes}B images={len(form.files)}"
            if form.nbytes < INLINE_PREP_BYTES:
                prepared = service.prepare(form)
            else:
                prepared = await anyio.to_thread.run_sync(service.prepare, form, limiter=prep_limiter)
        except FormError as exc:
            return _error(exc.status, exc.field, exc.message, rid)
        loop = asyncio.get_running_loop()
        job = Job(rid=rid, key=tuple(sorted(prepared["decoding"].items())), batch=prepared["batch"],
                  decoding=prepared["decoding"], loop=loop, future=loop.create_future())
        try:
            batcher.submit(job)
        except QueueFull:
            return _error(503, "queue", "the server is busy; retry later", rid, {"Retry-After": str(s.retry_after_s)})
        except ServerClosing as exc:
            return _error(503, "server", str(exc), rid)
        try:
            report = await job.future
        except ServerClosing as exc:
            return _error(503, "server", str(exc), rid)
        except WorkerTimeout as exc:  # the batch hung: the worker was killed and restarted
            log.error("request %s: %s", rid, exc)
            return _error(504, "server", str(exc), rid)
        except Exception as exc:  # generation failed for this batch: one clean 500 per request, type only logged
            log.error("request %s: generation failed: %s", rid, type(exc).__name__)
            return _error(500, "server", "generation failed; the request id is in the server log", rid)
        timings = {"queue": (job.t_start - job.t_submit) * 1000, "preprocessing": prepared["preprocessing_ms"],
                   "generation": (job.t_end - job.t_start) * 1000,
                   "total": (time.perf_counter() - t_arrive) * 1000}
        timings = {k: round(v, 1) for k, v in timings.items()}
        request.state.log_extra += (f" batch={job.batch_size} queue={timings['queue']}ms "
                                    f"pre={timings['preprocessing']}ms gen={timings['generation']}ms")
        out = {"id": rid, "report": report, "prompt": prepared["prompt"], "views": prepared["views"],
               "model_hash": service.facts["model_hash"], "template": prepared["template"],
               "decoding": prepared["decoding"], "timings_ms": timings, "batch_size": job.batch_size,
               "findings": service.findings(report), "code_version": service.facts["code_version"],
               "prior": prepared.get("prior")}
        if prepared["ignored"]:
            out["warnings"] = [f"template '{prepared['template']}' has no '{n}' slot: {n} was not used"
                               for n in prepared["ignored"]]
        # Plain JSON types already: a JSONResponse skips FastAPI's jsonable_encoder walk of the whole answer.
        return JSONResponse(out)

    @app.post("/v1/preview", summary="one image rendered through the server's image pipeline, as PNG",
              openapi_extra=_PREVIEW_SCHEMA)
    async def preview(request: Request):
        rid = request.state.rid
        try:
            form = await _read_form(request, max_files=1)
            # 'images' as in /v1/reports; 'image', the first name of this field, is still accepted
            if len(form.files) != 1 or form.files[0].field not in ("images", "image") or form.fields:
                raise FormError(422, "images", "send exactly one file in the 'images' field")
            f = form.files[0]
            request.state.log_extra = f" in={len(f.data)}B"
            png = await anyio.to_thread.run_sync(_preview_png, service, f.data, f.filename, limiter=prep_limiter)
        except FormError as exc:
            return _error(exc.status, exc.field, exc.message, rid)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request):
        allowed = {"app.js": "text/javascript", "app.css": "text/css"}
        if name not in allowed:
            return _error(404, "path", "not found", request.state.rid)
        return FileResponse(str(STATIC / name), media_type=allowed[name])

    return app


def _preview_png(service: ReportService, data: bytes, filename: str) -> bytes:
    im = service.decode_image(data, filename, "images")
    im.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buf = io.BytesIO()
    im.convert("L").save(buf, format="PNG")  # radiographs are grayscale; a third of the bytes
    return buf.getvalue()
