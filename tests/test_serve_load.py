"""benchmarks/serve_load.py's own HTTP client: what it counts must be what the server answered.

The benchmark's verdict (>= 3x, zero lost) is only as good as its client, a minimal HTTP/1.1 loop written for the
benchmark; these tests run it against a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from live import LiveServer  # noqa: E402

from clinicalblip.data.manifest import read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def service(trained_release):
    import torch

    from clinicalblip.serve import load_service

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_service(str(trained_release), in_process=True)
    torch.set_num_threads(threads)


def _forms(synth_manifest, n=4):
    recs = [r for r in read_manifest(synth_manifest) if len(r["images"]) == 2 and r.get("indication")][:n]
    return [([("images", (f"v{i}.png", Path(im["path"]).read_bytes(), "image/png")) for i, im in enumerate(r["images"])],
             {"indication": r["indication"], "views": ["PA", "LATERAL"]}) for r in recs]


def test_the_encoded_request_is_the_study_the_server_reads(serve_load, service, synth_manifest):
    from fastapi.testclient import TestClient

    from clinicalblip.serve.app import create_app

    files, data = _forms(synth_manifest, 1)[0]
    raw = serve_load.encode_request("h", files, {**data, "max_new_tokens": "8"})
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert int(headers["Content-Length"]) == len(body)
    with TestClient(create_app(service.with_settings(service.settings))) as c:
        ours = c.post("/v1/reports", content=body, headers={"Content-Type": headers["Content-Type"]}).json()
        ref = c.post("/v1/reports", files=files, data={**data, "max_new_tokens": "8"}).json()
    assert ours["prompt"] == ref["prompt"] and ours["report"] == ref["report"] and ours["views"] == ["PA", "LATERAL"]


def test_load_counts_every_answer_once_and_loses_nothing(serve_load, service, synth_manifest):
    from clinicalblip.serve.app import create_app
    from clinicalblip.serve.engine import ServeSettings

    app = create_app(service.with_settings(ServeSettings(max_batch=4, max_wait_ms=20, max_queue=64)))
    with LiveServer(app) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        res = asyncio.run(serve_load.load("127.0.0.1", port, _forms(synth_manifest), clients=6, duration=2.0,
                                          extra={"max_new_tokens": "8"}))
        batcher = app.state.batcher
        assert res["lost"] == 0 and set(res["codes"]) == {200}
        assert res["codes"][200] == len(res["latencies"]) == sum(res["batch_sizes"].values()) == batcher.jobs_done
        assert max(res["batch_sizes"]) > 1  # six clients at once were batched

        # A full queue: the 503s are counted as such (clean refusals), none as lost.
        small = create_app(service.with_settings(ServeSettings(max_batch=1, max_queue=1)))
        with LiveServer(small) as busy:
            small.state.batcher.hold()
            loop_res = {}

            async def run():
                task = asyncio.create_task(serve_load.load("127.0.0.1", int(busy.url.rsplit(":", 1)[1]),
                                                           _forms(synth_manifest), clients=3, duration=1.5,
                                                           extra={"max_new_tokens": "8"}))
                await asyncio.sleep(1.0)
                small.state.batcher.release()
                loop_res.update(await task)

            asyncio.run(run())
        assert loop_res["lost"] == 0 and loop_res["codes"][503] >= 2 and loop_res["codes"][200] >= 1
        assert set(loop_res["codes"]) == {200, 503}


def test_exchange_reads_chunked_answers(serve_load):
    async def main():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            payload = json.dumps({"batch_size": 3}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n" % 5 + payload[:5] + b"\r\n" + b"%x\r\n" % (len(payload) - 5) + payload[5:]
                         + b"\r\n0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            conn = await asyncio.open_connection("127.0.0.1", port)
            status, headers, body = await serve_load.exchange(*conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn[1].close()
        return status, headers, body

    status, headers, body = asyncio.run(main())
    assert status == 200 and json.loads(body) == {"batch_size": 3} and headers["transfer-encoding"] == "chunked"
