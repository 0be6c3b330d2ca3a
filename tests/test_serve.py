"""The server: API behaviour, dynamic batching, back-pressure, auth, hostile input and privacy."""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import re
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pydicom = pytest.importorskip("pydicom")
from fastapi.testclient import TestClient  # noqa: E402
from conftest import dx_dataset  # noqa: E402

from clinicalblip.data.images import load_image  # noqa: E402
from clinicalblip.data.manifest import read_manifest  # noqa: E402
from clinicalblip.generate import _dir_hash  # noqa: E402
from clinicalblip.metrics.labeler import label_report  # noqa: E402
from clinicalblip.serve import load_service  # noqa: E402
from clinicalblip.serve.app import create_app  # noqa: E402
from clinicalblip.serve.engine import ServeSettings  # noqa: E402

PHI = {"PatientName": "Doe^Janet^Q", "PatientID": "PID-99887766", "PatientBirthDate": "19510317",
       "StudyDate": "20240229", "AccessionNumber": "ACC-5551234", "InstitutionName": "St Elsewhere Hospital"}
PHI_FILENAME = "Janet_Doe_PID-99887766.dcm"


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The server's worker, request threads and other processes share 2 cores: one OpenMP thread avoids spinning
    (see the trained_release fixture)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studies(synth_manifest):
    return [r for r in read_manifest(synth_manifest) if len(r["images"]) == 2]


@pytest.fixture(scope="module")
def service(trained_release):
    """The model loaded in this process: the API tests are about HTTP behaviour, and a shared in-process model keeps
    them fast. The worker-process path (what `serve` runs) has its own tests below."""
    return load_service(str(trained_release), in_process=True)


def make_app(service, **settings):
    """Another app on the same loaded model (a ReportService per settings; the weights are shared)."""
    return create_app(service.with_settings(ServeSettings(**settings)))


@pytest.fixture(scope="module")
def client(service):
    with TestClient(make_app(service, max_wait_ms=5)) as c:
        yield c


def png_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def study_files(record, n_views=2, names=("frontal.png", "lateral.png")):
    return [("images", (names[i], png_bytes(im["path"]), "image/png")) for i, im in enumerate(record["images"][:n_views])]


def dicom_bytes(pixels: np.ndarray | None, **elements) -> bytes:
    ds = dx_dataset(pixels, 12, **elements)
    if pixels is not None:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_of(path) -> bytes:
    """A 12-bit DICOM of a synthetic PNG (values x16), with PHI in the header."""
    arr = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16
    return dicom_bytes(arr, **PHI)


def bomb_png(side: int = 12000) -> bytes:
    """A valid grayscale PNG of side x side zero pixels: 144 M pixels in ~150 kB."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    comp = zlib.compressobj(6)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def good_request(client, record, **data):
    """A small good request (few tokens): the server must still answer it after any bad one."""
    r = client.post("/v1/reports", files=study_files(record),
                    data={"max_new_tokens": "8", "indication": record["indication"], **data})
    assert r.status_code == 200, r.text
    assert r.json()["report"]
    return r.json()


# ---------------------------------------------------------------------------------------------- happy paths
def test_health_and_model_info(client, service, trained_release):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["max_queue"] == 64
    m = client.get("/v1/model").json()
    assert m["kind"] == "release" and m["stages"] == ["stage1"] and m["base"]["name"] == "tiny"
    assert m["template"]["name"] == "findings_with_context" and "indication" in m["template"]["slots"]
    assert m["model_hash"] == _dir_hash(str(trained_release))
    assert m["decoding_defaults"]["max_new_tokens"] == service.rm.max_new_tokens == 96
    assert m["limits"]["max_file_bytes"] == 50 * 2**20 and m["limits"]["max_views"] == 2
    assert m["card"]["source"] == "README.md" and "Not a medical device" in m["card"]["intended_use"]
    assert "findings_no_context" in m["templates"]
    spec = client.get("/openapi.json").json()
    assert "/v1/reports" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/v1/reports"])
    assert client.get("/docs").status_code == 200


def test_report_two_views_matches_the_library(client, service, studies):
    rec = studies[0]
    r = client.post("/v1/reports", files=study_files(rec), data={"indication": rec["indication"],
                                                                  "views": ["PA", "LATERAL"]})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = service.rm.report([im["path"] for im in rec["images"]], indication=rec["indication"],
                            views=["PA", "LATERAL"])
    assert out["report"] == ref["report"] and out["prompt"] == ref["prompt"]
    assert f"Indication: {' '.join(rec['indication'].split())}" in out["prompt"] and "Views: PA, LATERAL" in out["prompt"]
    assert out["views"] == ["PA", "LATERAL"] and out["template"] == "findings_with_context"
    assert out["decoding"] == {"num_beams": 1, "max_new_tokens": 96, "do_sample": False}
    assert out["findings"]["labels"] == label_report(out["report"])
    assert set(out["timings_ms"]) == {"queue", "preprocessing", "generation", "total"}
    assert out["model_hash"] == service.facts["model_hash"] and len(out["id"]) == 16
    assert r.headers["x-request-id"] == out["id"]


def test_views_are_ordered_frontal_first_and_single_view_works(client, studies):
    rec = studies[1]
    files = study_files(rec)
    r = client.post("/v1/reports", files=[files[1], files[0]], data={"views": ["lateral", "pa"]})
    assert r.status_code == 200 and r.json()["views"] == ["PA", "LATERAL"]
    one = client.post("/v1/reports", files=files[:1]).json()
    assert one["views"] == [None] and "Views:" not in one["prompt"]


def test_dicom_upload_and_preview(client, studies):
    rec = studies[2]
    dcm = dicom_of(rec["images"][0]["path"])
    r = client.post("/v1/reports", files=[("images", ("study.dcm", dcm, "application/dicom"))],
                    data={"views": "PA", "indication": "Cough."})
    assert r.status_code == 200, r.text
    assert r.json()["views"] == ["PA"] and r.json()["report"]
    # Extension-less DICOM is recognised by its DICM marker; the preview goes through our DICOM pipeline.
    p = client.post("/v1/preview", files=[("image", ("blob", dcm, "application/octet-stream"))])
    assert p.status_code == 200 and p.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(p.content)))
    want = np.asarray(load_image(rec["images"][0]["path"]).convert("L"))  # 8-bit x16 windowed over 0..4095
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_stage_folder_is_served_with_the_default_card(stage1_dir, studies):
    svc = load_service(str(stage1_dir))  # the default: the model in a worker process
    try:
        with TestClient(create_app(svc)) as c:
            m = c.get("/v1/model").json()
            assert m["kind"] == "stage" and m["stages"] == ["stage1"] and m["card"]["source"] == "default"
            assert "not for clinical use" in m["card"]["intended_use"]
            assert m["generation"]["mode"] == "worker-process" and m["runtime"]["dtype"] == "fp32"
            good_request(c, studies[0])
    finally:
        svc.close()


def test_template_choice_and_unused_slot_warning(client, studies):
    r = client.post("/v1/reports", files=study_files(studies[0], 1),
                    data={"max_new_tokens": "8", "template": "findings_no_context", "indication": "Fever."})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["template"] == "findings_no_context" and "Fever" not in out["prompt"]
    assert out["warnings"] == ["template 'findings_no_context' has no 'indication' slot: indication was not used"]


# ---------------------------------------------------------------------------------------------- batching
def test_batch_of_8_equals_one_at_a_time(service, studies):
    """Greedy reports do not depend on batch mates: mixed view counts and prompt lengths, left padding."""
    requests = []
    for i, rec in enumerate(studies[:8]):
        data = {"indication": (rec["indication"] or "") + (" Long history of smoking and cough." * (i % 3)),
                "max_new_tokens": "40"}
        requests.append((study_files(rec, 1 + i % 2), data))
    with TestClient(make_app(service, max_batch=8, max_wait_ms=5000)) as c:
        with ThreadPoolExecutor(8) as pool:
            batched = list(pool.map(lambda fd: c.post("/v1/reports", files=fd[0], data=fd[1]).json(), requests))
        assert c.app.state.batcher.batches_run == 1
    assert [b["batch_size"] for b in batched] == [8] * 8
    with TestClient(make_app(service, max_batch=1)) as c:
        alone = [c.post("/v1/reports", files=f, data=d).json() for f, d in requests]
    assert [a["batch_size"] for a in alone] == [1] * 8
    assert [b["report"] for b in batched] == [a["report"] for a in alone]
    assert [b["prompt"] for b in batched] == [a["prompt"] for a in alone]
    assert len({a["report"] for a in alone}) > 1  # the studies differ, so equality means something
    assert len({b["id"] for b in batched}) == 8


def test_incompatible_decoding_is_not_batched_together(service, studies):
    with TestClient(make_app(service, max_batch=8, max_wait_ms=1500)) as c:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda k: c.post("/v1/reports", files=study_files(studies[k], 1),
                                                   data={"max_new_tokens": str(8 + 4 * (k % 2))}).json(), range(4)))
    by_len = {}
    for o in outs:
        by_len.setdefault(o["decoding"]["max_new_tokens"], []).append(o["batch_size"])
    assert by_len == {8: [2, 2], 12: [2, 2]}


def test_full_queue_answers_503_and_loses_nothing(service, studies):
    with TestClient(make_app(service, max_batch=1, max_queue=2)) as c:
        batcher = c.app.state.batcher
        batcher.hold()
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(c.post, "/v1/reports", files=study_files(studies[k], 1),
                                   data={"max_new_tokens": "8"}) for k in range(2)]
            deadline = time.time() + 30
            while len(batcher) < 2 and time.time() < deadline:
                time.sleep(0.01)
            assert len(batcher) == 2
            busy = c.post("/v1/reports", files=study_files(studies[2], 1))
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["field"] == "queue"
            batcher.release()
            done = [f.result(timeout=60) for f in waiting]
        assert [d.status_code for d in done] == [200, 200]
        assert len({d.json()["id"] for d in done}) == 2
        assert batcher.jobs_done == 2 and len(batcher) == 0
        good_request(c, studies[3])


def test_large_uploads_are_preprocessed_off_the_event_loop(service, studies, monkeypatch):
    """Small studies are decoded on the loop; a real-radiograph-sized upload goes to the preprocessing threads."""
    import anyio.to_thread

    from clinicalblip.serve import app as app_module

    real, seen = anyio.to_thread.run_sync, []

    async def spy(func, *args, **kw):
        seen.append(getattr(func, "__name__", ""))
        return await real(func, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", spy)
    noise = np.random.default_rng(0).integers(0, 256, (700, 700), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > app_module.INLINE_PREP_BYTES
    with TestClient(make_app(service)) as c:
        small = c.post("/v1/reports", files=study_files(studies[0], 1), data={"max_new_tokens": "8"})
        assert small.status_code == 200 and "prepare" not in seen
        r = c.post("/v1/reports", files=[("images", ("big.png", buf.getvalue(), "image/png"))],
                   data={"max_new_tokens": "8", "views": "PA"})
        assert r.status_code == 200 and r.json()["report"] and r.json()["views"] == ["PA"]
    assert seen.count("prepare") == 1


# ---------------------------------------------------------------------------------------------- model worker process
def test_worker_process_reports_equal_in_process_and_a_crash_costs_one_batch(trained_release, service, studies,
                                                                            tmp_path, monkeypatch):
    """`serve`'s default: the model in its own process. Same greedy reports as in process (batched there too); a
    worker that dies mid-batch fails that batch with a clean 500, and a new worker serves the next request, as it
    does after a kill while idle."""
    die = tmp_path / "die-now"
    monkeypatch.setenv("CLINICALBLIP_TEST_WORKER_DIE_FILE", str(die))  # the spawned worker inherits it
    svc = load_service(str(trained_release), settings=ServeSettings(max_batch=4, max_wait_ms=3000))
    try:
        assert svc.rm is None and svc.worker.alive and svc.worker.pid != os.getpid()
        with TestClient(create_app(svc)) as c:
            gen = c.get("/v1/model").json()["generation"]
            assert {k: gen[k] for k in ("mode", "pid", "alive", "restarts")} == \
                {"mode": "worker-process", "pid": svc.worker.pid, "alive": True, "restarts": 0}
            recs = studies[:4]
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda rec: c.post("/v1/reports", files=study_files(rec),
                                                       data={"indication": rec["indication"]}).json(), recs))
            assert [o["batch_size"] for o in got] == [4] * 4
            for rec, out in zip(recs, got):
                ref = service.rm.report([im["path"] for im in rec["images"]], indication=rec["indication"])
                assert out["report"] == ref["report"] and out["prompt"] == ref["prompt"]
            assert len({o["report"] for o in got}) > 1

            first = svc.worker.pid
            die.touch()
            r = c.post("/v1/reports", files=study_files(recs[0]), data={"indication": recs[0]["indication"]})
            assert r.status_code == 500 and r.json()["error"]["field"] == "server", r.text
            assert not die.exists()  # the worker did take the batch, and died in it
            h = c.get("/health").json()
            assert h["status"] == "ok" and h["generation"]["restarts"] == 1 and h["generation"]["pid"] != first
            again = c.post("/v1/reports", files=study_files(recs[0]), data={"indication": recs[0]["indication"]})
            assert again.status_code == 200 and again.json()["report"] == got[0]["report"]

            os.kill(svc.worker.pid, signal.SIGKILL)
            deadline = time.time() + 30
            while svc.worker.alive and time.time() < deadline:
                time.sleep(0.05)
            assert c.get("/health").json()["status"] == "degraded"
            ok = c.post("/v1/reports", files=study_files(recs[1]), data={"indication": recs[1]["indication"]})
            assert ok.status_code == 200 and ok.json()["report"] == got[1]["report"]
            assert c.get("/health").json()["generation"]["restarts"] == 2
    finally:
        svc.close()
    assert not svc.worker.alive and svc.generation_info()["pid"] is None


def test_a_model_the_worker_cannot_load_is_a_clear_error(tmp_path):
    from clinicalblip.errors import UserError

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a stage folder .* nor a release folder"):
        load_service(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------- hostile input
def _bad_cases(rec):
    frontal = png_bytes(rec["images"][0]["path"])
    buf = io.BytesIO()
    Image.open(rec["images"][0]["path"]).convert("RGB").save(buf, format="JPEG")
    jpeg = buf.getvalue()
    img = [("images", ("a.png", frontal, "image/png"))]
    return [
        ("not an image", [("images", ("notes.png", b"%PDF-1.4 this is not a picture" * 20, "image/png"))], {},
         422, "images[0]", "cannot decode"),
        ("truncated PNG", [("images", ("a.png", frontal[: len(frontal) // 2], "image/png"))], {}, 422, "images[0]",
         "cannot decode"),
        ("truncated JPEG", [("images", ("a.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"))], {}, 422, "images[0]",
         "cannot decode"),
        ("DICOM without pixels", [("images", ("a.dcm", dicom_bytes(None, **PHI), "application/dicom"))], {}, 422,
         "images[0]", "no pixel data"),
        ("decompression bomb", [("images", ("bomb.png", bomb_png(), "image/png"))], {}, 422, "images[0]",
         "above the limit of 40,000,000 pixels"),
        ("zero images", [("indication", (None, b"Cough.", "text/plain"))], {}, 422, "images", "at least one image"),
        ("three views", img * 3, {}, 422, "images", "at most 2 views"),
        ("six files", img * 6, {}, 422, "images", "too many files"),  # views + 1 + the prior's images
        ("views mismatch", img, {"views": ["PA", "LATERAL"]}, 422, "views", "1 image"),
        ("unknown template", img, {"template": "no_such_template"}, 422, "template", "unknown template"),
        ("NUL in a context slot", img, {"age": "5\x004"}, 422, "age", "NUL character"),
        ("unknown field", img, {"patient_name": "x"}, 422, "patient_name", "unknown field"),
        ("num_beams 1000", img, {"num_beams": "1000"}, 422, "num_beams", "out of range"),
        ("max_new_tokens 1e6", img, {"max_new_tokens": "1000000"}, 422, "max_new_tokens", "out of range"),
        ("max_new_tokens float", img, {"max_new_tokens": "1e6"}, 422, "max_new_tokens", "not an integer"),
        ("temperature -1", img, {"do_sample": "true", "temperature": "-1"}, 422, "temperature", "out of range"),
        ("temperature nan", img, {"do_sample": "true", "temperature": "nan"}, 422, "temperature", "finite"),
        ("top_p 2", img, {"do_sample": "true", "top_p": "2"}, 422, "top_p", "out of range"),
        ("beams with sampling", img, {"do_sample": "true", "num_beams": "4"}, 422, "num_beams", "do not combine"),
        ("non-UTF-8 indication", img + [("indication", (None, b"Cough \xff\xfe\xc3(", "text/plain"))], {}, 422,
         "indication", "not valid UTF-8"),
        ("10 MB indication", img + [("indication", (None, b"a" * (10 * 2**20), "text/plain"))], {}, 413,
         "indication", "larger than the limit"),
        ("repeated indication", img, {"indication": ["a", "b"]}, 422, "indication", "given 2 times"),
    ]


def test_hostile_input_gets_4xx_naming_the_field_and_the_server_keeps_working(client, studies):
    rec = studies[0]
    for name, files, data, status, field, words in _bad_cases(rec):
        r = client.post("/v1/reports", files=files, data=data or None)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["field"] == field and words in err["message"], (name, err)
        good_request(client, rec)


def test_oversize_upload_and_non_multipart_body(client, studies):
    big = b"\x89PNG" + b"\x00" * (50 * 2**20)  # one byte over 50 MB
    r = client.post("/v1/reports", files=[("images", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["field"] == "images"
    assert "50 MB" in r.json()["error"]["message"]
    good_request(client, studies[0])
    r = client.post("/v1/reports", json={"indication": "x"})
    assert r.status_code == 415 and r.json()["error"]["field"] == "content-type"
    good_request(client, studies[0])


def test_uploads_are_never_written_to_disk(client, studies, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise AssertionError("an upload went to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((1100, 1100)) * 255).astype(np.uint8)).save(buf, format="PNG")
    assert len(buf.getvalue()) > 2**20  # over Starlette's 1 MB spooling threshold
    r = client.post("/v1/reports", files=[("images", ("big.png", buf.getvalue(), "image/png"))],
                    data={"max_new_tokens": "8"})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- security
def test_api_key_guards_every_route_in_constant_time(service, studies, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    with TestClient(make_app(service, api_key="s3cret-key")) as c:
        for method, path in (("get", "/health"), ("get", "/v1/model"), ("get", "/"), ("get", "/static/app.js"),
                             ("get", "/docs"), ("get", "/openapi.json"), ("post", "/v1/reports"),
                             ("post", "/v1/preview")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Basic s3cret-key"}):
                r = getattr(c, method)(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.get("/health", headers=ok).status_code == 200 and c.get("/", headers=ok).status_code == 200
        r = c.post("/v1/reports", files=study_files(studies[0], 1), data={"max_new_tokens": "8"}, headers=ok)
        assert r.status_code == 200
    assert calls  # the key was compared with hmac.compare_digest


def test_no_auth_when_no_key(client):
    assert client.get("/").status_code == 200 and "compare without the indication" in client.get("/").text.lower()


def test_no_phi_in_logs_or_answers(client, studies, caplog, capfd):
    rec = studies[0]
    caplog.set_level(logging.DEBUG)
    answers = []
    dcm = dicom_of(rec["images"][0]["path"])
    r = client.post("/v1/reports", files=[("images", (PHI_FILENAME, dcm, "application/dicom"))],
                    data={"views": "PA"})
    assert r.status_code == 200
    answers.append(r.text)
    bad = client.post("/v1/reports", files=[("images", (PHI_FILENAME, dicom_bytes(None, **PHI), "application/dicom"))])
    assert bad.status_code == 422
    answers.append(bad.text)
    p = client.post("/v1/preview", files=[("image", (PHI_FILENAME, dcm, "application/dicom"))])
    assert p.status_code == 200
    answers.append(p.headers.__repr__())
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    assert f"request {r.json()['id']} POST /v1/reports 200" in caplog.text  # request id, sizes, timings only
    assert f"in={len(dcm) + 2}B images=1" in caplog.text  # the upload and the 2-byte view
    secrets = list(PHI.values()) + ["Janet", "Doe", PHI_FILENAME, "99887766", "Elsewhere"]
    for s in secrets:
        assert s not in logs, f"{s} leaked into the logs"
        for a in answers:
            assert s not in a, f"{s} leaked into an answer"


def test_serve_command_warns_off_loopback_and_reads_the_key(trained_release, monkeypatch, capsys):
    import uvicorn

    from clinicalblip.cli import main

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append((app, kw)))
    # The default runs the model in a worker process, which the command stops when uvicorn returns.
    assert main(["serve", str(trained_release), "--host", "0.0.0.0", "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: binding 0.0.0.0:8123 without --api-key-env" in err
    assert ran[-1][1]["host"] == "0.0.0.0" and ran[-1][1]["port"] == 8123 and ran[-1][1]["access_log"] is False
    svc = ran[-1][0].state.service
    assert svc.settings.api_key is None and svc.worker is not None and svc.rm is None
    assert re.search(r"\[fp32 on cpu, generation worker process \d+, max batch 8", out), out
    assert not svc.worker.alive  # stopped by serve() on the way out
    monkeypatch.setenv("CB_TEST_KEY", "k-123")
    assert main(["serve", str(trained_release), "--host", "0.0.0.0", "--api-key-env", "CB_TEST_KEY",
                 "--max-batch", "4", "--in-process"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in err and "generation in process" in out
    svc = ran[-1][0].state.service
    assert svc.settings.api_key == "k-123" and svc.settings.max_batch == 4 and svc.worker is None
    assert main(["serve", str(trained_release), "--in-process"]) == 0 and "WARNING" not in capsys.readouterr().err
    monkeypatch.delenv("CB_TEST_KEY")
    assert main(["serve", str(trained_release), "--api-key-env", "CB_TEST_KEY"]) == 2
    assert "CB_TEST_KEY" in capsys.readouterr().err
    assert main(["serve", str(trained_release / "missing")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    pytest.importorskip("bitsandbytes")
    assert main(["serve", str(trained_release), "--quantization", "4bit"]) == 0  # bitsandbytes runs on the CPU too
    svc = ran[-1][0].state.service
    assert svc.facts["runtime"]["quantization"] == "4bit" and svc.facts["runtime"]["dtype"] == "bf16"
    assert "[bf16 on cpu, 4bit, generation worker process" in capsys.readouterr().out


def test_batcher_resolves_every_job_once_even_when_a_batch_fails():
    import asyncio

    from clinicalblip.serve.batching import Batcher, Job

    calls = []

    def run(jobs):
        calls.append(len(jobs))
        if any(j.rid == "boom" for j in jobs):
            raise RuntimeError("generation failed")
        return [j.rid.upper() for j in jobs]

    async def main():
        b = Batcher(run, max_batch=4, max_wait_ms=50, max_queue=16)
        b.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(rid=r, key=("a",) if r != "boom" else ("b",), batch={}, decoding={}, loop=loop,
                    future=loop.create_future()) for r in ("x", "y", "boom", "z")]
        for j in jobs:
            b.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        b.stop()
        return results

    results = asyncio.run(main())
    assert results[0] == "X" and results[1] == "Y" and results[3] == "Z"
    assert isinstance(results[2], RuntimeError)
    assert sorted(calls) == [1, 3]
