"""Shared test fixtures: the repository on sys.path, one torch thread, and a toy-sized run."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# every stage of the protocol at a toy size: seconds, not minutes (the numbers mean nothing)
TINY_RUN = ["--preset=smoke", "--tiny_model=micro", "--llm_model=micro", "--pretrain_steps_tiny=20",
            "--pretrain_steps_llm=20", "--ft_steps=6", "--n_train=48", "--n_shadow=6",
            "--n_snapshots=2", "--snapshot_gap=2", "--gt_steps=4", "--gt_eval_every=2",
            "--n_test=24", "--threads=1", "--workers=1"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # these models are tiny: on a busy 2-core machine, intra-op threads only fight each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
