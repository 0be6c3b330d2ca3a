"""serve and the decode path: a hung generation fails with 504 and restarts the worker; /health says "warming"
while the worker compiles and warms up; warm-up timings are reported."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from clinicalblip.data.manifest import read_manifest  # noqa: E402
from clinicalblip.serve import load_service  # noqa: E402
from clinicalblip.serve.app import create_app  # noqa: E402
from clinicalblip.serve.engine import ServeSettings  # noqa: E402
from clinicalblip.serve.worker import ModelWorker  # noqa: E402


def _files(rec):
    return [("images", (f"v{i}.png", open(im["path"], "rb").read(), "image/png")) for i, im in enumerate(rec["images"])]


@pytest.fixture(scope="module")
def study(synth_manifest):
    return read_manifest(synth_manifest, split="test")[0]


def test_a_hung_worker_fails_its_batch_with_504_and_is_restarted(trained_release, study, tmp_path, monkeypatch):
    hang = tmp_path / "hang-now"
    monkeypatch.setenv("CLINICALBLIP_TEST_WORKER_HANG_FILE", str(hang))  # the spawned worker inherits it
    svc = load_service(str(trained_release), settings=ServeSettings(max_batch=2, max_wait_ms=5,
                                                                     generation_timeout_s=4), compile=False)
    try:
        with TestClient(create_app(svc)) as c:
            ok = c.post("/v1/reports", files=_files(study), data={"max_new_tokens": "8"})
            assert ok.status_code == 200, ok.text
            first = svc.worker.pid
            hang.touch()
            t0 = time.perf_counter()
            r = c.post("/v1/reports", files=_files(study), data={"max_new_tokens": "8"})
            assert r.status_code == 504, r.text
            assert "time limit of 4 s" in r.json()["error"]["message"] and "restarted" in r.json()["error"]["message"]
            assert 4 <= time.perf_counter() - t0 < 60
            assert not hang.exists()  # the worker did take the batch, and hung in it
            h = c.get("/health").json()
            gen = h["generation"]
            assert h["status"] == "ok" and gen["restarts"] == 1 and gen["pid"] != first and gen["alive"]
            assert "time limit" in gen["last_restart"] and gen["timeout_s"] == 4
            again = c.post("/v1/reports", files=_files(study), data={"max_new_tokens": "8"})
            assert again.status_code == 200 and again.json()["report"] == ok.json()["report"]
    finally:
        svc.close()


def test_health_says_warming_until_the_warm_up_is_done(trained_release, study, monkeypatch):
    monkeypatch.setenv("CLINICALBLIP_TEST_WARMUP_DELAY_S", "3")
    worker = ModelWorker(str(trained_release), warm_batches=(1, 2), timeout_s=60)
    worker.start(background_warmup=True)
    try:
        from clinicalblip.serve.engine import ReportService

        svc = ReportService(worker, ServeSettings(max_batch=2, max_wait_ms=5))
        with TestClient(create_app(svc)) as c:
            h = c.get("/health").json()
            assert h["status"] == "warming" and h["generation"]["warming"] is True
            # a request sent while warming waits for the warm-up and is then answered
            r = c.post("/v1/reports", files=_files(study), data={"max_new_tokens": "8"})
            assert r.status_code == 200, r.text
            h = c.get("/health").json()
            assert h["status"] == "ok" and h["generation"]["warming"] is False
            w = h["generation"]["warmup"]
            assert set(w["batch_seconds"]) == {"1", "2"} and w["total_s"] >= 0 and w["compile"] is False
    finally:
        worker.close()


@pytest.mark.slow
def test_compiled_server_warms_up_and_writes_what_the_eager_one_writes(trained_release, study):
    """--compile on the CPU: compile + warm-up at start (minutes on 2 cores the first time), same reports."""
    eager = load_service(str(trained_release), in_process=True, compile=False)
    svc = load_service(str(trained_release), settings=ServeSettings(max_batch=1), compile=True)
    try:
        assert svc.worker.compile and svc.worker.warmup["batch_seconds"]["1"] > 0
        with TestClient(create_app(svc)) as c, TestClient(create_app(eager)) as e:
            a = c.post("/v1/reports", files=_files(study), data={"max_new_tokens": "16"}).json()
            b = e.post("/v1/reports", files=_files(study), data={"max_new_tokens": "16"}).json()
            assert a["report"] == b["report"]
    finally:
        svc.close()
