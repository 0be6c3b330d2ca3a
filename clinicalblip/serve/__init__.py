"""`clinicalblip serve`: a REST API and a web page for a trained model, on one FastAPI/uvicorn server.

    engine.py    settings, model facts, validation and preprocessing (in memory)
    batching.py  the bounded queue and the dynamic-batching worker
    forms.py     the in-memory multipart parser with per-field limits
    app.py       routes, auth, logging, errors
    static/      the page at / (plain HTML/JS/CSS, no CDN)

The model is loaded once (a stage folder or a release, through `clinicalblip.generate.ReportModel`, never with
trust_remote_code) and stays warm; one worker thread runs generation.
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


def load_service(model_dir: str, dtype: str | None = None, quantization: str = "none", settings=None):
    """Load the model once and wrap it for serving (a ReportService)."""
    import torch

    from clinicalblip.generate import ReportModel
    from clinicalblip.serve.engine import ReportService

    if dtype is None:
        dtype = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    rm = ReportModel.load(model_dir, dtype=dtype, quantization=quantization)
    return ReportService(rm, settings)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          quantization: str = "none", max_batch: int = 8, max_wait_ms: float = 15.0, max_queue: int = 64,
          api_key_env: str | None = None, max_file_mb: float = 50.0, max_views: int | None = None,
          threads: int | None = None, log_level: str = "info") -> None:
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
    if threads:
        import torch

        torch.set_num_threads(threads)
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_file_mb=max_file_mb, max_views=max_views, api_key=key)
    service = load_service(model_dir, dtype=dtype, quantization=quantization, settings=settings)
    from PIL import Image

    # Uploads are checked against max_pixels on their header; PIL's own guard (it raises above twice this) covers
    # any other decode in this process.
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    from clinicalblip.serve.app import create_app

    app = create_app(service)
    info = service.facts
    print(f"serving {info['kind']} {info['model_dir']} (hash {info['model_hash']}) on http://{host}:{port}/ "
          f"[max batch {max_batch}, max wait {max_wait_ms:g} ms, queue {max_queue}, "
          f"auth {'on' if key else 'off'}]", flush=True)
    # uvicorn's access log would print client addresses and query strings; our middleware logs what we allow.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
