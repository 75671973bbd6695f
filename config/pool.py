"""
config/pool.py -- independent fine-tunes side by side. A stage of train.py hands over its items
(shadow subsets, clients); they go in contiguous chunks, each chunk one batched computation
(tinylm.finetune_many), and on a CPU the chunks are shared by worker processes: two
single-threaded processes get through about 1.7x the work of one process with two threads.

A chunk's results depend only on its items and their seeds, never on the process that computes
it: a worker makes its own copy of what the stage reads (the settings, the task, both base models
from their cached checkpoints), and is handed nothing else. Under torchrun the ranks take the
workers' place, across machines too (config/dist.py).
"""
import math
import multiprocessing as mp
from functools import partial

import numpy as np
import torch

from config import dist as distributed
from config.stages import run_stage


def run_chunked(cfg, path, desc, fn, items, *, device, state, rebuild, ranks=None):
    """fn(state, chunk) over chunks of the items (one result per item of the chunk) as a cached,
    resumable stage (config/stages.py); the results, one per item, in order. state: what fn reads
    in this process; rebuild = (function, arguments) makes the same state in a worker process.
    Under torchrun (ranks) each rank is one worker: the chunks are those of as many workers as
    ranks, shared out by config/dist.py, so --workers=N and N ranks compute the very same chunks."""
    if ranks is not None:
        chunks = chunked(items, cfg.batch_runs, ranks.world)
        compute = partial(distributed.map_chunks, ranks, partial(fn, state), stage=desc)
    else:
        chunks = chunked(items, cfg.batch_runs, cfg.workers if device == "cpu" else 1)
        compute = partial(worker_map, cfg, fn, device=device, state=state, rebuild=rebuild)
    done = run_stage(cfg, path, desc, chunks, compute, ranks)
    return [result for chunk in done for result in chunk]


def chunked(items, size, workers):
    """items in contiguous chunks of at most `size` (1: one each), as many chunks as makes every
    worker's share of them equal."""
    if size <= 1:
        return [[item] for item in items]
    n = workers * math.ceil(len(items) / (workers * size))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def worker_map(cfg, fn, items, *, device, state, rebuild):
    """fn(state, item) for each of the items, in order, as an iterator: in this process (one
    worker, a GPU, or a single item), or in cfg.workers single-threaded processes on a CPU, where
    each item's state is made by rebuild = (function, arguments). The arguments travel pickled
    with the item -- the task among them: rebuilding the text corpus in a worker costs seconds."""
    if cfg.workers <= 1 or device != "cpu" or len(items) <= 1:
        for item in items:
            yield fn(state, item)
        return
    with mp.get_context("spawn").Pool(cfg.workers) as pool:
        yield from pool.imap(partial(in_worker, fn, rebuild), items)


def in_worker(fn, rebuild, item):
    """fn(state, item) in a worker process, one thread, with the state made there by rebuild."""
    torch.set_num_threads(1)
    make_state, arguments = rebuild
    return fn(make_state(*arguments), item)
