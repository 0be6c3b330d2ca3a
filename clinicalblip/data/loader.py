"""The DataLoader for training, validation and generation: image decoding overlaps with compute.

Worker processes build batches (decode, resize, tokenise) while the main process trains or generates. Two
things make that safe:

- The collator's per-epoch state reaches the workers with the data. Context dropout draws depend on the
  epoch, and a worker holds its own copy of the collator: setting `collate.epoch` in the main process would
  not reach it (with persistent workers, never). So the sampler yields `(epoch, index)` pairs, read from the
  epoch sampler at iteration time in the main process, and the worker sets its copy's epoch before
  collating. Batches are then a pure function of (seed, epoch, indices) whatever the worker count, and a
  resume that skips the first batches of an epoch sees exactly the batches an uninterrupted run saw.
- Defaults fit the machine: `num_workers=-1` means every CPU this rank may use beyond its own (on a GPU the
  main process mostly waits for kernels, so it counts as free), divided among the ranks on the node; workers
  persist across epochs; memory is pinned when a GPU is present; each worker keeps `prefetch_factor` batches
  ahead.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_num_workers(processes_per_node: int | None = None, gpu: bool | None = None) -> int:
    """Loader workers per rank that this machine affords: its CPUs shared among the node's ranks, less the
    rank's own process on CPU (it computes), at most MAX_AUTO_WORKERS."""
    local = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    per_rank = available_cpus() // max(1, local)
    return max(0, min(MAX_AUTO_WORKERS, per_rank if gpu else per_rank - 1))


def resolve_num_workers(num_workers: int | None, processes_per_node: int | None = None) -> int:
    """-1 / None -> default_num_workers(); otherwise the number given."""
    if num_workers is None or num_workers < 0:
        return default_num_workers(processes_per_node)
    return int(num_workers)


class EpochTagged(Sampler):
    """Wraps a sampler with an `epoch` (set_epoch): yields (epoch, index) so the epoch travels with the data."""

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def __iter__(self):
        epoch = self.epoch  # read once per pass, in the main process, when the epoch's iteration starts
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class RecordItems(Dataset):
    """Manifest records as a map-style dataset; an item is (epoch or None, record)."""

    def __init__(self, records: Sequence[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        return epoch, self.records[i]


class EpochCollate:
    """Runs the collator on a batch's records after giving it the batch's epoch (inside the worker)."""

    def __init__(self, collate: Callable, return_records: bool = False):
        self.collate = collate
        self.return_records = return_records

    def __call__(self, items):
        epochs = {e for e, _ in items}
        if len(epochs) > 1:  # a batch never spans two epochs: each epoch is its own pass of the sampler
            raise RuntimeError(f"a batch mixes epochs {sorted(epochs)}")
        epoch = next(iter(epochs))
        if epoch is not None and hasattr(self.collate, "epoch"):
            self.collate.epoch = epoch
        records = [r for _, r in items]
        batch = self.collate(records)
        return (records, batch) if self.return_records else batch


def make_loader(records: Sequence[dict], batch_size: int, collate_fn: Callable, sampler=None,
                num_workers: int | None = -1, pin_memory: bool | None = None, prefetch_factor: int = 4,
                return_records: bool = False, processes_per_node: int | None = None) -> DataLoader:
    """A DataLoader over manifest records whose batches come from `collate_fn` (a StudyCollator).

    sampler: e.g. the training EpochSampler (anything with `epoch`/`set_epoch` gets its epoch carried into
    the workers); None reads the records in order. num_workers: -1 = what the machine affords (see
    default_num_workers), 0 = collate in the main process. return_records: batches are (records, batch).
    """
    workers = resolve_num_workers(num_workers, processes_per_node)
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": max(1, prefetch_factor)}
    return DataLoader(
        RecordItems(records), batch_size=batch_size, shuffle=False,
        sampler=EpochTagged(sampler) if sampler is not None else None,
        collate_fn=EpochCollate(collate_fn, return_records=return_records), num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, **kwargs,
    )


def run_on_rank0(fn: Callable):
    """fn() on rank 0 only, its result (or its exception) handed to every rank; plain fn() without
    torch.distributed. Used for work every rank needs but only one should do (the record check)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank must leave the broadcast, then raise the same error
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value
