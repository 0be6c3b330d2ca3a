"""Dynamic batching: concurrent studies with the same decoding settings share one `generate` call.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the oldest, then up to
`max_batch - 1` more with the same decoding key, waiting at most `max_wait_ms` (counted from the oldest
request's arrival, so under load a batch leaves as soon as the previous one is done). Every job leaves the
queue exactly once, under the lock, and its future is resolved exactly once: with the text, or with the error
of its batch, or with `ServerClosing` at shutdown.

A study's text does not depend on its batch mates: each study keeps its own pixel rows and Q-Former
instruction, prompts are left-padded (decoder-only) with an attention mask, and generation derives position
ids from that mask, so greedy decoding in a batch of 8 gives the same tokens as one at a time
(tests/test_serve.py checks it).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch


class QueueFull(Exception):
    """The bounded queue is full: answer 503 with Retry-After."""


class ServerClosing(Exception):
    """The server stopped before the job ran."""


@dataclass
class Job:
    """One study waiting for generation. `batch` is the single-study batch from StudyCollator."""

    rid: str
    key: tuple
    batch: dict
    decoding: dict
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_end: float = 0.0
    batch_size: int = 0

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def _set():
            if self.future.done():  # the client went away (cancelled): nothing to answer
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


def merge_batches(batches: list[dict], pad_id: int, qformer_pad_id: int, left_pad: bool) -> dict:
    """Single-study batches -> one batch: pixel rows stacked, Q-Former rows right-padded, prompts padded
    (left for decoder-only models), each with its attention mask."""
    pixel_values = torch.cat([b["pixel_values"] for b in batches])
    q_rows = [row[m.bool()] for b in batches for row, m in zip(b["qformer_input_ids"], b["qformer_attention_mask"])]
    lm_rows = [row[m.bool()] for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])]
    q_ids, q_mask = _pad(q_rows, qformer_pad_id, left=False)
    ids, mask = _pad(lm_rows, pad_id, left=left_pad)
    return {"pixel_values": pixel_values, "qformer_input_ids": q_ids, "qformer_attention_mask": q_mask,
            "input_ids": ids, "attention_mask": mask}


def _pad(rows: list[torch.Tensor], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), value, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if left else slice(0, len(r))
        out[i, sl] = r
        mask[i, sl] = 1
    return out, mask


class Batcher:
    """The queue and its worker thread. `run_batch(jobs) -> list[str]` does the generation."""

    def __init__(self, run_batch, max_batch: int = 8, max_wait_ms: float = 15.0, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms >= 0")
        self.run_batch = run_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._held = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.jobs_done = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="clinicalblip-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.resolve(error=ServerClosing("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def hold(self) -> None:
        """Stop taking jobs (they keep queueing); `release()` resumes. For maintenance and tests."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ queue
    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def full(self) -> bool:
        return len(self) >= self.max_queue

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                raise ServerClosing("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} studies are waiting (limit {self.max_queue})")
            job.t_submit = time.perf_counter()
            self._queue.append(job)
            self._cond.notify_all()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                while (not self._queue or self._held) and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return None
                first = self._queue[0]
                deadline = first.t_submit + self.max_wait
                while True:
                    same = [j for j in self._queue if j.key == first.key][: self.max_batch]
                    remaining = deadline - time.perf_counter()
                    if len(same) >= self.max_batch or remaining <= 0 or self._stop or self._held:
                        break
                    self._cond.wait(remaining)
                if self._stop:
                    return None
                if self._held:
                    continue
                for j in same:
                    self._queue.remove(j)
                return same

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            t0 = time.perf_counter()
            for j in jobs:
                j.t_start, j.batch_size = t0, len(jobs)
            try:
                texts = self.run_batch(jobs)
                if len(texts) != len(jobs):
                    raise RuntimeError(f"generation returned {len(texts)} texts for {len(jobs)} studies")
            except Exception as exc:  # one bad batch must not take the worker down
                for j in jobs:
                    j.t_end = time.perf_counter()
                    j.resolve(error=exc)
                continue
            t1 = time.perf_counter()
            self.batches_run += 1
            self.jobs_done += len(jobs)
            for j, text in zip(jobs, texts):
                j.t_end = t1
                j.resolve(result=text)
