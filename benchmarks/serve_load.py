"""Server under load: 64 concurrent clients against `clinicalblip serve`, dynamic batching vs --max-batch 1.

    python benchmarks/serve_load.py [--model runs/demo/release] [--clients 64] [--duration 30] [--max-batch 8]

Starts the server (a subprocess, 127.0.0.1 only) on the tiny release — `--model`, else runs/demo/release when it
exists, else a tiny release trained here for 80 steps on synthetic data — then runs N concurrent clients for a
bounded time, each posting a synthetic frontal + lateral study with an indication and waiting for its report.
A 503 is a clean refusal (the client waits Retry-After and goes on); anything else that is not a 200 is an
error, and a request without any answer is lost. The same run follows with --max-batch 1. Prints a table and
writes JSON to --out (default $OUT/serve_load.json or runs/serve_load.json).
Configurations alternate for --rounds rounds, so a drifting machine load hits both alike. The clients are a
minimal HTTP/1.1 loop (see `load`): on a 2-core box they share the CPU with the server, so they must cost little.
CPU per request is reported for the server process and for its model worker process.
Target: dynamic batching >= 3x the requests/s of batch 1 at 64 clients, zero lost requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_tiny_release(workdir: Path) -> Path:
    """A tiny release that writes report sentences: 80 steps on 300 synthetic studies, merged (~15 s idle)."""
    import torch

    from clinicalblip.config import load_stage_config
    from clinicalblip.data.synth import write_synthetic_dataset
    from clinicalblip.merge import merge_stage_chain
    from clinicalblip.train import train_stage

    torch.set_num_threads(1)
    manifest = write_synthetic_dataset(workdir / "synth", n=300, seed=3)
    stage = workdir / "stage1"
    cfg = load_stage_config(str(REPO / "configs" / "tiny" / "stage1.yaml"),
                            [f"output_dir={stage}", f"data.manifest={manifest}", "train.max_steps=80",
                             "train.batch_size=16", "data.val_max=4", "train.log_every=40"])
    train_stage(cfg)
    merge_stage_chain(str(stage), str(workdir / "release"))
    return workdir / "release"


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int, max_wait_ms: float, max_queue: int, threads: int | None,
                 in_process: bool = False, compile: bool | None = None, decode: str | None = None):
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "clinicalblip", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max_queue)]
    if threads:
        cmd += ["--threads", str(threads)]
    if in_process:
        cmd += ["--in-process"]
    if compile is not None:
        cmd += ["--compile" if compile else "--no-compile"]
    if decode:
        cmd += ["--decode", decode]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


async def wait_ready(url: str, proc, timeout: float = 1800.0) -> None:
    """Until /health answers and no longer says "warming" (a --compile server compiles after loading)."""
    import httpx

    deadline = time.time() + timeout
    async with httpx.AsyncClient() as c:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode}")
            try:
                r = await c.get(url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") != "warming":
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


def _study_forms(manifest: Path, n: int = 16) -> list[tuple[list, dict]]:
    from clinicalblip.data.manifest import read_manifest

    forms = []
    for r in read_manifest(str(manifest)):
        if len(r["images"]) != 2 or not r.get("indication"):
            continue
        files = [("images", (f"v{i}.png", Path(im["path"]).read_bytes(), "image/png")) for i, im in enumerate(r["images"])]
        forms.append((files, {"indication": r["indication"], "views": ["PA", "LATERAL"]}))
        if len(forms) == n:
            break
    return forms


def encode_request(host: str, files: list, data: dict) -> bytes:
    """One whole POST /v1/reports request (headers + multipart body), encoded once and sent many times."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, values in data.items():
        for v in values if isinstance(values, list) else [values]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                         + str(v).encode() + b"\r\n")
    for name, (filename, content, ctype) in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/reports HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def exchange(reader, writer, request: bytes) -> tuple[int, dict, bytes]:
    """Send one request on a keep-alive connection and read its whole response (Content-Length or chunked)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, headers, bytes(body)
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


async def load(host: str, port: int, forms, clients: int, duration: float, extra: dict) -> dict:
    """`clients` loops posting studies until `duration` has passed; in-flight requests are awaited.

    The client is a minimal HTTP/1.1 one over asyncio streams, with every request encoded once up front: it runs
    on the same 2 cores as the server, and httpx spent 2-7 ms of CPU per request (more than the server's own
    per-request work), so it measured the load generator as much as the server.
    """
    requests = [encode_request(f"{host}:{port}", files, {**data, **extra}) for files, data in forms]
    latencies, codes, batch_sizes, lost, lost_kinds = [], Counter(), Counter(), 0, Counter()
    t_end = time.perf_counter() + duration

    async def client(k: int):
        nonlocal lost
        i, conn = k, None
        while time.perf_counter() < t_end:
            request = requests[i % len(requests)]
            i += clients
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                status, headers, body = await asyncio.wait_for(exchange(*conn, request), 300)
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ValueError, IndexError) as exc:  # no (whole) answer: this request is lost
                lost += 1
                lost_kinds[type(exc).__name__] += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            codes[status] += 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)
                batch_sizes[json.loads(body)["batch_size"]] += 1
            elif status == 503:
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            if headers.get("connection", "").lower() == "close":
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"wall": time.perf_counter() - t0, "client_cpu": time.process_time() - cpu0, "latencies": latencies,
            "codes": codes, "batch_sizes": batch_sizes, "lost": lost, "lost_kinds": lost_kinds}


def summarise(max_batch: int, parts: list[dict], args) -> dict:
    """Rounds of one configuration folded together: requests/s over the summed wall time, latency percentiles."""
    lat = sorted(x for p in parts for x in p["latencies"])
    codes, sizes = sum((p["codes"] for p in parts), Counter()), sum((p["batch_sizes"] for p in parts), Counter())
    wall = sum(p["wall"] for p in parts)
    ok = codes.get(200, 0)

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1000, 1) if lat else None

    return {"max_batch": max_batch, "max_wait_ms": args.max_wait_ms, "clients": args.clients, "rounds": len(parts),
            "requests_ok": ok, "wall_s": round(wall, 2), "requests_per_s": round(ok / wall, 2) if wall else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "codes": {str(k): v for k, v in sorted(codes.items())}, "lost": sum(p["lost"] for p in parts),
            "lost_kinds": dict(sum((p["lost_kinds"] for p in parts), Counter())),
            "errors": {str(k): v for k, v in sorted(codes.items()) if k not in (200, 503)},
            "mean_batch": round(sum(k * v for k, v in sizes.items()) / max(1, ok), 2),
            "client_cpu_ms_per_request": round(sum(p["client_cpu"] for p in parts) * 1000 / max(1, ok), 2),
            "server_cpu_ms_per_request": round(sum(p["server_cpu"] for p in parts) * 1000 / max(1, ok), 2),
            "worker_cpu_ms_per_request": round(sum(p["worker_cpu"] for p in parts) * 1000 / max(1, ok), 2)}


async def run_one(model: Path, forms, max_batch: int, args, compile: bool | None = None,
                  decode: str | None = None) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = start_server(model, port, max_batch, args.max_wait_ms, args.max_queue, args.threads,
                             args.in_process, compile, decode)
    try:
        t0 = time.perf_counter()
        await wait_ready(url, proc)
        ready_s = time.perf_counter() - t0
        extra = {"max_new_tokens": str(args.max_new_tokens)} if args.max_new_tokens else {}
        async with httpx.AsyncClient() as c:  # warm-up: first calls pay one-off costs
            for files, data in forms[:3]:
                (await c.post(url + "/v1/reports", files=files, data={**data, **extra}, timeout=300)).raise_for_status()
        workers = _children(proc.pid)  # the model worker process (none with --in-process)
        cpu0, wcpu0 = _proc_cpu(proc.pid), sum(_proc_cpu(w) for w in workers)
        res = await load("127.0.0.1", port, forms, args.clients, args.duration, extra)
        res["server_cpu"] = _proc_cpu(proc.pid) - cpu0
        res["worker_cpu"] = sum(_proc_cpu(w) for w in workers) - wcpu0
        res["ready_s"] = ready_s
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="release or stage folder (default: runs/demo/release, else built)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per configuration and round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="configurations alternate this many times (a shared machine's load drifts)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[8], help="dynamic-batching configuration(s)")
    ap.add_argument("--max-wait-ms", type=float, default=15.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per request (default: the model's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's --threads (default 1: on a shared 2-core box two OpenMP threads spin; 0 = "
                         "torch's choice)")
    ap.add_argument("--in-process", action="store_true",
                    help="the server's --in-process (generation in the server process, no model worker)")
    ap.add_argument("--compare-compile", action="store_true",
                    help="each --max-batch with the server's --compile and --no-compile (instead of against "
                         "--max-batch 1); start-up time (load + compile + warm-up) reported")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.compare_compile:
        return compare_compile(args)
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs") / "serve_load.json"
    configs = list(dict.fromkeys([*args.max_batch, 1]))
    parts: dict[int, list] = {mb: [] for mb in configs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or (REPO / "runs" / "demo" / "release")
        built = False
        if not model.exists():
            print(f"[serve_load] {model} not found: training a tiny release for the benchmark", flush=True)
            model, built = build_tiny_release(tmp), True
        from clinicalblip.data.synth import write_synthetic_dataset

        forms = _study_forms(write_synthetic_dataset(tmp / "load", n=40, seed=11))
        for rnd in range(args.rounds):
            for mb in configs:
                print(f"[serve_load] round {rnd + 1}/{args.rounds}: --max-batch {mb}, {args.clients} clients for "
                      f"{args.duration:g} s", flush=True)
                parts[mb].append(asyncio.run(run_one(model, forms, mb, args)))
    rows = [summarise(mb, parts[mb], args) for mb in configs]
    base = rows[-1]["requests_per_s"]
    lost = sum(r["lost"] for r in rows) + sum(sum(r["errors"].values()) for r in rows)
    header = (f"{'max_batch':>9} {'clients':>7} {'req/s':>8} {'vs b1':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'mean batch':>10} {'ok':>6} {'srv cpu/req':>11} {'model cpu/req':>13}  codes, lost")
    print(header)
    for r in rows:
        r["speedup"] = round(r["requests_per_s"] / base, 2) if base else None
        print(f"{r['max_batch']:>9} {r['clients']:>7} {r['requests_per_s']:>8.2f} {r['speedup']:>5}x {r['p50_ms']:>8} "
              f"{r['p95_ms']:>8} {r['p99_ms']:>8} {r['mean_batch']:>10} {r['requests_ok']:>6} "
              f"{r['server_cpu_ms_per_request']:>9}ms {r['worker_cpu_ms_per_request']:>11}ms  {r['codes']}, "
              f"lost {r['lost']}")
    speedup = rows[0]["speedup"] or 0.0
    verdict = "PASS" if speedup >= 3 and lost == 0 else "FAIL"
    print(f"--max-batch {rows[0]['max_batch']}: {speedup:.2f}x the requests/s of --max-batch 1 (target >= 3x); "
          f"lost requests or non-503 errors: {lost} (target 0) -> {verdict}")
    result = {"benchmark": "serve_load", "model": "tiny release trained by the benchmark" if built else str(model),
              "rows": rows, "speedup": speedup, "lost_or_errors": lost, "target_speedup": 3.0,
              "pass": verdict == "PASS", "duration_s": args.duration, "rounds": args.rounds,
              "threads": args.threads, "generation": "in-process" if args.in_process else "worker-process",
              "client": "minimal asyncio HTTP/1.1, requests encoded once", "machine": platform.platform(),
              "cpus": os.cpu_count(),
              "load_avg_after": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def compare_compile(args) -> None:
    """serve --compile against --no-compile (and against --decode hf, plain generate) at each --max-batch,
    alternating for --rounds rounds."""
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs") / "serve_load_compile.json"
    configs = [(mb, c) for mb in args.max_batch for c in (True, False, "hf")]
    parts: dict = {cfg: [] for cfg in configs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or (REPO / "runs" / "demo" / "release")
        if not model.exists():
            print(f"[serve_load] {model} not found: training a tiny release for the benchmark", flush=True)
            model = build_tiny_release(tmp)
        from clinicalblip.data.synth import write_synthetic_dataset

        forms = _study_forms(write_synthetic_dataset(tmp / "load", n=40, seed=11))
        for rnd in range(args.rounds):
            for mb, c in configs:
                flag = "--decode hf" if c == "hf" else "--compile" if c else "--no-compile"
                print(f"[serve_load] round {rnd + 1}/{args.rounds}: --max-batch {mb} {flag}, {args.clients} "
                      f"clients for {args.duration:g} s", flush=True)
                parts[(mb, c)].append(asyncio.run(run_one(model, forms, mb, args, compile=c is True,
                                                          decode="hf" if c == "hf" else None)))
    rows = []
    for mb, c in configs:
        r = summarise(mb, parts[(mb, c)], args)
        r["compile"] = c is True
        r["decode"] = "hf" if c == "hf" else "fast"
        r["ready_s"] = [round(p["ready_s"], 1) for p in parts[(mb, c)]]
        rows.append(r)
    print(f"{'max_batch':>9} {'decode':>14} {'req/s':>8} {'vs eager':>8} {'vs hf':>6} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'ok':>6} {'ready s':>12}  codes, lost")
    lost = 0
    for r in rows:
        eager = next(x for x in rows if x["max_batch"] == r["max_batch"] and not x["compile"]
                     and x["decode"] == "fast")
        hf = next(x for x in rows if x["max_batch"] == r["max_batch"] and x["decode"] == "hf")
        r["speedup_vs_hf"] = round(r["requests_per_s"] / hf["requests_per_s"], 2) if hf["requests_per_s"] else None
        r["speedup_vs_no_compile"] = round(r["requests_per_s"] / eager["requests_per_s"], 2) \
            if eager["requests_per_s"] else None
        lost += r["lost"] + sum(r["errors"].values())
        name = "hf generate" if r["decode"] == "hf" else "fast compiled" if r["compile"] else "fast eager"
        print(f"{r['max_batch']:>9} {name:>14} {r['requests_per_s']:>8.2f} "
              f"{r['speedup_vs_no_compile']:>7}x {r['speedup_vs_hf']:>5}x {r['p50_ms']:>8} {r['p95_ms']:>8} "
              f"{r['requests_ok']:>6} "
              f"{str(r['ready_s']):>12}  {r['codes']}, lost {r['lost']}")
    result = {"benchmark": "serve_load --compare-compile", "model": str(model), "rows": rows,
              "lost_or_errors": lost, "duration_s": args.duration, "rounds": args.rounds, "threads": args.threads,
              "machine": platform.platform(), "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
