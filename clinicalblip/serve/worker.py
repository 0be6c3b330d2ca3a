"""The model worker: generation runs in its own process, fed by the server's batcher thread over a pipe.

Why a process: in one process the event loop (HTTP parsing, multipart, image decoding, tokenising, JSON) and
`generate` share one GIL. Every torch op releases and retakes it, so under load each waits for the other and
neither keeps a core busy. Apart, the server process does the per-request work on one core while the worker keeps
generating on another. The server process holds no weights: it gets the processor, template and limits (a
`ModelFront`) from the worker once it has loaded the model, so a 7B model is in memory (or on the GPU) once.

Protocol (multiprocessing Connection, pickled): the worker sends ("ready", front) or ("failed", kind, message)
after loading; then for each (batch of numpy arrays, decoding) it answers ("ok", texts) or ("error", type,
message). None, or the server's end closing, stops it. The worker ignores SIGINT: Ctrl-C reaches the whole
process group, and the server decides when its worker stops.

A worker that dies (killed, out of memory) fails the batch it was running with an error, and is started again
before the next batch, so one crash costs the requests of one batch and the server keeps serving.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading

from clinicalblip.errors import UserError

log = logging.getLogger("clinicalblip.serve")
TEST_DIE_FILE = "CLINICALBLIP_TEST_WORKER_DIE_FILE"  # tests: the worker exits mid-batch when this file exists
TEST_HANG_FILE = "CLINICALBLIP_TEST_WORKER_HANG_FILE"  # tests: the worker hangs mid-batch when this file exists
TEST_WARM_DELAY = "CLINICALBLIP_TEST_WARMUP_DELAY_S"  # tests: the warm-up takes at least this long


class WorkerError(RuntimeError):
    """The model worker could not run a batch: it failed inside generate, or exited."""


class WorkerTimeout(WorkerError):
    """A batch ran past the generation time limit: the worker was killed and a new one started."""


def load_model(model_dir: str, dtype: str | None, quantization: str, threads: int | None, compile: bool = False,
               decode: str = "fast"):
    """The ReportModel that serving generates with (in the worker, or in the server with --in-process). dtype None:
    bf16 on a GPU that supports it, else fp32. compile: the decoding step through torch.compile."""
    import torch

    from clinicalblip.generate import ReportModel, default_dtype

    if threads:
        torch.set_num_threads(threads)
    if dtype is None:
        dtype = default_dtype("cuda" if torch.cuda.is_available() else "cpu")
    rm = ReportModel.load(model_dir, dtype=dtype, quantization=quantization)
    rm.compile, rm.decode = compile, decode
    return rm


def _worker_main(conn, model_dir: str, dtype: str | None, quantization: str, threads: int | None,
                 compile: bool = False, warm_batches: tuple = (), decode: str = "fast") -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        rm = load_model(model_dir, dtype, quantization, threads, compile, decode)
        front = rm.front()
    except UserError as exc:
        conn.send(("failed", "user", str(exc)))
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which stops with the message
        conn.send(("failed", type(exc).__name__, str(exc)))
        return
    conn.send(("ready", front))
    if warm_batches:
        from clinicalblip.decode import warm_up

        try:
            if os.environ.get(TEST_WARM_DELAY):
                threading.Event().wait(float(os.environ[TEST_WARM_DELAY]))
            conn.send(("warm", warm_up(rm, warm_batches)))
        except Exception as exc:  # noqa: BLE001 - a failed warm-up leaves compilation to the first requests
            conn.send(("warm", {"error": f"{type(exc).__name__}: {exc}"}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if msg is None:
            return
        arrays, decoding = msg
        die = os.environ.get(TEST_DIE_FILE)
        if die and os.path.exists(die):
            os.unlink(die)
            os._exit(3)
        hang = os.environ.get(TEST_HANG_FILE)
        if hang and os.path.exists(hang):
            os.unlink(hang)
            threading.Event().wait()  # a generation that never returns
        try:
            batch = {k: torch.from_numpy(v) for k, v in arrays.items()}
            d = dict(decoding)
            texts = rm.generate_batch(batch, max_new_tokens=d.pop("max_new_tokens"), num_beams=d.pop("num_beams"), **d)
            conn.send(("ok", texts))
        except Exception as exc:  # noqa: BLE001 - this batch fails; the worker goes on
            conn.send(("error", type(exc).__name__, str(exc)))


class ModelWorker:
    """One worker process holding the model. `generate` is called by one thread at a time (the batcher's)."""

    def __init__(self, model_dir: str, dtype: str | None = None, quantization: str = "none",
                 threads: int | None = None, compile: bool = False, warm_batches: tuple = (),
                 timeout_s: float | None = None, decode: str = "fast"):
        self.model_dir, self.dtype, self.quantization, self.threads = model_dir, dtype, quantization, threads
        # compile: torch.compile the decoding step; warm_batches: batch sizes generated once after loading, so
        # that compilation happens before the first request; timeout_s: the longest a batch may take
        self.compile, self.warm_batches, self.timeout_s = compile, tuple(warm_batches), timeout_s
        self.decode = decode  # fast: clinicalblip.decode; hf: plain transformers generate (for comparisons)
        self.warming = False
        self.warmup: dict | None = None  # what the last warm-up took (seconds per batch size, total)
        self.last_restart: str | None = None
        self.on_warm = None  # called with the warm-up record when a background warm-up ends
        self._ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child; spawn is also safe with threads
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self.front = None
        self.restarts = 0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, background_warmup: bool = False):
        """Start the process and wait until the model is loaded; returns its ModelFront. A model that cannot be
        loaded raises UserError with the worker's message. With warm_batches, the warm-up runs after loading:
        waited for here, or (background_warmup) in a thread while `warming` is True and batches wait for it."""
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, name="clinicalblip-model",
                                 args=(child, self.model_dir, self.dtype, self.quantization, self.threads,
                                       self.compile, self.warm_batches, self.decode),
                                 daemon=True)
        proc.start()
        child.close()
        try:
            while not parent.poll(0.5):
                if not proc.is_alive():
                    raise UserError(f"the model worker exited with code {proc.exitcode} while loading "
                                    f"{self.model_dir} (out of memory?)")
            reply = parent.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise UserError(f"the model worker exited with code {proc.exitcode} while loading {self.model_dir}") \
                from None
        except BaseException:
            proc.kill()
            raise
        if reply[0] != "ready":
            proc.join(30)
            kind, message = reply[1], reply[2]
            raise UserError(message if kind == "user" else f"loading {self.model_dir} failed: {kind}: {message}")
        self._proc, self._conn, self.front = proc, parent, reply[1]
        if self.warm_batches:
            self.warming = True
            if background_warmup:
                self._lock.acquire()  # batches wait until the warm-up is done; released by the thread
                threading.Thread(target=self._finish_warmup, args=(True,), name="clinicalblip-warmup",
                                 daemon=True).start()
            else:
                self._finish_warmup(False)
        return self.front

    def _finish_warmup(self, release: bool) -> None:
        try:
            reply = self._conn.recv()
            self.warmup = reply[1] if reply[0] == "warm" else {"error": "unexpected reply"}
            log.info("model worker warm-up: %s", self.warmup)
            if self.on_warm is not None:
                self.on_warm(self.warmup)
        except (EOFError, OSError):
            self.warmup = {"error": "the worker exited during warm-up"}
        finally:
            self.warming = False
            if release:
                self._lock.release()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (it finishes the batch it is running first)."""
        with self._lock:
            self._closed = True
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()

    def _restart(self, why: str) -> None:
        self.last_restart = why
        old = self._proc
        code = old.exitcode if old is not None else None
        log.error("model worker (pid %s) %s, exit code %s: starting a new one", old.pid if old else "-", why, code)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        try:
            self.start()
        except UserError as exc:
            raise WorkerError(f"the model worker could not be restarted: {exc}") from None
        self.restarts += 1

    # ------------------------------------------------------------------ generation
    def generate(self, batch: dict, decoding: dict) -> list[str]:
        """One merged batch (tensors) -> its reports. Raises WorkerError when the batch could not be generated."""
        arrays = {k: v.numpy() for k, v in batch.items()}  # plain bytes over the pipe, no shared-memory handles
        with self._lock:
            if self._closed:
                raise WorkerError("the model worker is stopped")
            if not self.alive:
                self._restart("is not running")
            try:
                self._conn.send((arrays, decoding))
                if self.timeout_s is not None and not self._conn.poll(self.timeout_s):
                    self._proc.kill()  # a hung generation: nothing else would ever free the worker
                    self._proc.join(5)
                    self._restart(f"exceeded the generation time limit of {self.timeout_s:g} s")
                    raise WorkerTimeout(f"generation exceeded the time limit of {self.timeout_s:g} s; the model "
                                        "worker was restarted")
                reply = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                code = self._proc.exitcode
                self._restart("exited during generation")
                raise WorkerError(f"the model worker exited during generation (exit code {code}); a new one "
                                  "is serving") from None
        if reply[0] == "ok":
            return reply[1]
        raise WorkerError(f"generation failed in the model worker: {reply[1]}: {reply[2]}")
