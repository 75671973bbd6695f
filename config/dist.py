"""
config/dist.py -- the protocol across ranks with torchrun (torch.distributed), nanoGPT's way.

    torchrun --standalone --nproc_per_node=8 train.py                # 8 ranks, one machine
    torchrun --standalone --nproc_per_node=8 experiments/sweep.py --experiment=frontier --cache=out
    # two machines, 8 GPUs each: the same command on both (HOST: the first machine's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py

Without torchrun (no RANK in the environment) nothing here runs and nothing changes. Under it:
- split: pretraining is data-parallel on GPUs and across machines (tinylm.pretrain wraps the model
  in DistributedDataParallel; every rank draws the global batch and trains on its slice). Ranks
  that share one machine's CPU cores do not split it: rank 0 pretrains alone with all their
  threads while the others wait (`data_parallel`). The shadow, shadow DP, client and
  reference fine-tunes go out in whole chunks, round by round (round j: rank r computes chunk
  j * world + r), and every rank gets every result back (all_gather_object). The chunks are those
  of --workers=world in one process: from the same base models, 2 ranks give the very pairs of
  `python train.py` (two workers); another count changes a chunk's make-up, which moves a pair by
  round-off only (tests/test_distributed.py checks 1e-6 relative against --workers=1).
- not split: the fit and the evaluation run on rank 0, with the threads of the ranks beside it
  (they are done by then).
- sweeps: the stages the points share (base models, clean shadow runs) are made first by all ranks
  together; then rank r runs points r, r + world, ... alone (one worker, its fine-tunes not split).
- files: rank 0 reads and writes the cache (atomically) and hands what it read to the other ranks,
  so a run needs the cache on rank 0's disk only; a sweep across machines needs --cache on a disk
  they share. A rerun resumes from whatever stages finished.
- threads: each rank is one worker (--workers is unused), with torchrun's OMP_NUM_THREADS threads.
- devices: Gloo on CPUs; on GPUs NCCL, rank r on cuda:LOCAL_RANK (written, not tested here: this
  project's tests run Gloo on the CPU only).
- failures: a rank that raises names itself and its stage on stderr; a rank that waits longer than
  --dist_timeout seconds for the others (one of them hung or died) says so too; torchrun then ends
  the job. Ranks that wait for rank 0's pretraining (one CPU machine) or, in a sweep, for each
  other at its end, wait through that work: --dist_timeout must exceed it (the default, 30 minutes,
  does for the presets here).
"""
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """Where this process sits in a torchrun job."""
    rank: int          # 0 .. world - 1; rank 0 logs, writes the caches, fits and evaluates
    local_rank: int    # its index on this machine: its GPU is cuda:local_rank
    world: int         # processes in the job
    timeout: float     # seconds a rank waits for the others before it calls the job failed


def setup(cfg):
    """Ranks of this torchrun job (its process group joined once: Gloo on CPUs, NCCL on GPUs), or
    None when not launched by torchrun."""
    if "RANK" not in os.environ:
        return None
    ranks = Ranks(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                  world=int(os.environ["WORLD_SIZE"]), timeout=cfg.dist_timeout)
    if not dist.is_initialized():
        gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=ranks.timeout))
    return ranks


def device_of(ranks, device):
    """A rank's own device: cuda:LOCAL_RANK where the run picked CUDA, else `device` as it is."""
    if ranks is None or torch.device(device).type != "cuda":
        return device
    return f"cuda:{ranks.local_rank}"


def data_parallel(ranks, device):
    """Whether pretraining splits each batch across the ranks (DDP): on GPUs, or with ranks on more
    than one machine. Ranks on one machine's CPU cores share those cores: one process with all their
    threads takes the same step with no gradient exchange, sooner, and with the float sums of
    `python train.py`, so rank 0 pretrains alone there (`all_threads`)."""
    if ranks is None:
        return False
    one_machine = ranks.world == int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    return torch.device(device).type == "cuda" or not one_machine


@contextmanager
def all_threads(ranks):
    """Rank 0 with the threads of every rank on its machine, for work it does alone while they wait
    (pretraining on one CPU machine); its own share of them again afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def guarded(ranks, stage, step):
    """step() -> its result; a failure says which rank and stage, and a collective that waited past
    the timeout says why (torch's own message names neither)."""
    try:
        return step()
    except Exception as e:
        lost = isinstance(e, dist.DistBackendError) or "timed out" in str(e).lower()
        why = f"{type(e).__name__}: {e}"
        if lost:   # torch's message: a page of C++ frames; the first line says enough
            why = (f"no answer from the other ranks: one of them failed, or hangs past "
                   f"--dist_timeout={ranks.timeout:g}s ({why.splitlines()[0][:200]})")
        print(f"gradtx: rank {ranks.rank} of {ranks.world} failed in stage {stage!r}: {why}",
              file=sys.stderr, flush=True)
        raise


def map_chunks(ranks, fn, chunks, stage):
    """fn(chunk) for every chunk, in order, as an iterator of every rank's results: round j, rank r
    computes chunk j * world + r, then all ranks swap their round's results."""
    for start in range(0, len(chunks), ranks.world):
        mine = start + ranks.rank
        result = guarded(ranks, stage, lambda: fn(chunks[mine])) if mine < len(chunks) else None
        gathered = [None] * ranks.world
        guarded(ranks, stage, lambda: dist.all_gather_object(gathered, result))
        yield from gathered[:len(chunks) - start]


def from_rank0(ranks, make, stage):
    """make() on rank 0, handed to every rank (what it read or wrote, e.g. a cached stage)."""
    box = [make() if ranks.rank == 0 else None]
    guarded(ranks, stage, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def gather_to_rank0(ranks, value, stage):
    """[every rank's value] on rank 0 (by rank), None on the others."""
    box = [None] * ranks.world if ranks.rank == 0 else None
    guarded(ranks, stage, lambda: dist.gather_object(value, box, dst=0))
    return box


def barrier(ranks, stage):
    """Every rank waits here until all arrive (at most the timeout)."""
    guarded(ranks, stage, dist.barrier)


def take_idle_threads(ranks):
    """Rank 0 goes on alone (the fit, the evaluation): it takes the threads of this machine's other
    ranks, which are done."""
    if ranks is not None and ranks.rank == 0:
        torch.set_num_threads(torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def finish(ranks):
    """Leave the process group at the end of the job."""
    if ranks is not None and dist.is_initialized():
        dist.destroy_process_group()
