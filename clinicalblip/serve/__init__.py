"""`clinicalblip serve`: a REST API and a web page for a trained model, on one FastAPI/uvicorn server.

    engine.py    settings, model facts, validation and preprocessing (in memory)
    batching.py  the bounded queue and the dynamic-batching thread
    worker.py    the model worker process that runs generate
    forms.py     the in-memory multipart parser with per-field limits
    app.py       routes, auth, logging, errors
    static/      the page at / (plain HTML/JS/CSS, no CDN)

The model is loaded once (a stage folder or a release, through `clinicalblip.generate.ReportModel`, never with
trust_remote_code) in a worker process (worker.py) and stays warm; the server's batcher thread feeds it batches.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

from clinicalblip.errors import UserError

LOOPBACK_HOSTS = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses no other machine can reach."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_stack() -> tuple[str, str]:
    """The HTTP parser and event loop uvicorn's 'auto' settings will pick here."""
    from importlib.util import find_spec

    return ("httptools" if find_spec("httptools") else "h11"), ("uvloop" if find_spec("uvloop") else "asyncio")


def load_service(model_dir: str, dtype: str | None = None, quantization: str = "none", settings=None,
                 in_process: bool = False, threads: int | None = None, compile: bool | None = None,
                 background_warmup: bool = False, decode: str = "fast"):
    """Load the model once and wrap it for serving (a ReportService).

    By default the model is loaded in a worker process (serve/worker.py) and this process only handles HTTP and
    preprocessing; `in_process=True` loads it here (one GIL for both: slower under load, simpler to debug).
    A model that cannot be loaded raises UserError either way. Call `close()` on the service when done.
    compile (None: clinicalblip.decode.default_compile) compiles the decoding step and warms it up for every
    batch bucket up to max_batch after loading; background_warmup lets the server answer (/health: "warming")
    meanwhile. decode="hf" generates with plain transformers `generate` instead (for comparisons).
    """
    from clinicalblip.serve.engine import ReportService, ServeSettings

    if not os.path.exists(model_dir):
        raise UserError(f"model folder not found: {model_dir}")
    from clinicalblip.decode import default_compile, warm_batch_sizes, warm_up
    from clinicalblip.serve.worker import ModelWorker, load_model

    settings = settings or ServeSettings()
    if compile is None:
        import torch

        compile = default_compile("cuda" if torch.cuda.is_available() else "cpu")
    if decode not in ("fast", "hf"):
        raise UserError(f"unknown decode path '{decode}' (known: fast, hf)")
    compile = compile and decode == "fast"
    warm = warm_batch_sizes(settings.max_batch) if compile else ()
    if in_process:
        rm = load_model(model_dir, dtype, quantization, threads, compile, decode)
        service = ReportService(rm, settings)
        service.warmup = warm_up(rm, warm) if warm else None
        return service
    worker = ModelWorker(model_dir, dtype=dtype, quantization=quantization, threads=threads, compile=compile,
                         warm_batches=warm, timeout_s=settings.generation_timeout_s, decode=decode)
    worker.start(background_warmup=background_warmup)
    return ReportService(worker, settings)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          quantization: str = "none", max_batch: int = 8, max_wait_ms: float = 15.0, max_queue: int = 64,
          api_key_env: str | None = None, max_file_mb: float = 50.0, max_views: int | None = None,
          threads: int | None = None, log_level: str = "info", in_process: bool = False,
          compile: bool | None = None, generation_timeout_s: float | None = 300.0, decode: str = "fast") -> None:
    """Load MODEL_DIR and serve it until interrupted. Binding beyond loopback without an API key warns."""
    from clinicalblip.serve.engine import ServeSettings

    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or max_file_mb <= 0:
        raise UserError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0, --max-file-mb > 0")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serving needs the serve extra: pip install 'clinicalblip[serve]'") from None
    if not is_loopback(host) and key is None:
        print(f"WARNING: binding {host}:{port} without --api-key-env: anyone who can reach this address can "
              "use the model. Set an API key (--api-key-env VAR) or bind 127.0.0.1.", file=sys.stderr, flush=True)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if generation_timeout_s is not None and generation_timeout_s <= 0:
        raise UserError("--generation-timeout must be > 0 seconds")
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_file_mb=max_file_mb, max_views=max_views, api_key=key,
                             generation_timeout_s=generation_timeout_s)
    if not in_process:
        import torch

        # This process only parses, decodes and tokenises: one torch thread, no OpenMP pool spinning against the
        # worker, which has the --threads.
        torch.set_num_threads(1)
    service = load_service(model_dir, dtype=dtype, quantization=quantization, settings=settings,
                           in_process=in_process, threads=threads, compile=compile, background_warmup=True,
                           decode=decode)
    from PIL import Image

    # Uploads are checked against max_pixels on their header; PIL's own guard (it raises above twice this) covers
    # any other decode in this process.
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    from clinicalblip.serve.app import create_app

    app = create_app(service)
    info, gen = service.facts, service.generation_info()
    http, loop = http_stack()
    rt = info["runtime"]
    where = f"worker process {gen['pid']}" if gen["mode"] == "worker-process" else "in process"
    print(f"serving {info['kind']} {info['model_dir']} (hash {info['model_hash']}) on http://{host}:{port}/ "
          f"[{rt['dtype']} on {rt['device']}{'' if rt['quantization'] == 'none' else ', ' + rt['quantization']}, "
          f"generation {where}, max batch {max_batch}, max wait {max_wait_ms:g} ms, queue {max_queue}, "
          f"auth {'on' if key else 'off'}, {http} + {loop}, compile {'on' if gen.get('compile') else 'off'}]",
          flush=True)
    if gen.get("warming"):
        print("compiling and warming up the decoding step in the model worker: /health says \"warming\" and "
              "requests wait until it is done", flush=True)
    if service.worker is not None:
        service.worker.on_warm = lambda w: print(f"warm-up done in {w.get('total_s')} s (per batch size: "
                                                 f"{w.get('batch_seconds')}){' ' + w['error'] if 'error' in w else ''}",
                                                 flush=True)
    try:
        # uvicorn's access log would print client addresses and query strings; our middleware logs what we allow.
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        service.close()
