"""tools/bench_ops.py's launch count against counts known by hand: a matmul and an add launch two
kernels and a view none; a model's forward grows by the same count per layer; a multi-tensor
operator launches as CUDA's multi_tensor_apply splits it; the extrapolation of short runs recovers
a loop's fixed and per-step counts; the CUDA path it follows is the one CUDA takes; and a
captured CUDA graph counts its replays.

    python -m pytest tests/test_bench_ops.py
"""
import math

import torch

import tinylm
from tools import bench_ops


def test_a_matmul_and_an_add_launch_two_kernels_and_a_transpose_none():
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with bench_ops.LaunchCount() as count:
        (a @ b + b[0]).T                # mm, select (a view), add, permute (a view)
    assert count.launches == 2
    assert count.calls == 4


def test_a_forward_launches_the_same_count_more_per_layer():
    def forward_launches(n_layer):
        model = tinylm.GPT(tinylm.GPTConfig(n_layer=n_layer, n_head=2, n_embd=8))
        return bench_ops.launches_of(model, torch.zeros(2, 5, dtype=torch.long))
    one, two, three = (forward_launches(n) for n in (1, 2, 3))
    assert three - two == two - one > 10


def test_a_multi_tensor_operator_launches_once_per_tensors_that_fit():
    tensors = [torch.zeros(3) for _ in range(200)]
    with bench_ops.LaunchCount() as count:
        torch._foreach_add_(tensors, 1.0)           # depth 1: 110 tensors a launch
    assert count.calls == 1
    assert count.launches == math.ceil(200 / 110)
    # 100 tensors of 5 chunks of 65,536 elements: 320 chunks a launch (expanded: no memory)
    big = [torch.zeros(1).expand(5 * 65536)] * 100
    assert bench_ops.multi_tensor_launches("_foreach_add_", (big, 1.0)) == math.ceil(500 / 320)


def test_two_short_runs_give_a_loops_fixed_and_per_step_counts():
    x = torch.ones(3)

    def run(steps):
        y = x + 1                       # 1 launch once
        for _ in range(steps):
            y = (y * 2).sin()           # 2 launches a step
    assert bench_ops.fixed_and_per_step(run, (3, 7)) == (1, 2)


def test_the_cuda_paths_take_fused_adam_and_adamw_and_foreach_otherwise():
    params = [torch.zeros(4, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(4)

    def step_launches(optimizer):
        return bench_ops.launches_of(optimizer(params, lr=0.1).step)
    plain = step_launches(torch.optim.AdamW)
    with bench_ops.cuda_paths():
        fused_w = step_launches(torch.optim.AdamW)
        fused = step_launches(torch.optim.Adam)
        foreach = step_launches(bench_ops.CudaAdamW.__bases__[0])   # AdamW made without `fused`
        assert torch.optim.Adam(params).defaults["fused"]
        assert torch.optim.AdamW(params).defaults["fused"]
    assert fused_w == fused < foreach < plain


def test_a_captured_call_counts_its_graph_replays_and_keeps_the_gradient():
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)

    def loss_of(x):                     # 3 kernels eagerly: mul, sin, sum
        return (x * w).sin().sum()
    step = bench_ops.captured(loss_of, compile=True, device="cuda")
    with bench_ops.LaunchCount() as count:
        loss = step(x)
    assert count.launches == 2          # one replay, one copy of x into the graph's input
    with bench_ops.LaunchCount() as count:
        loss.backward()
    assert count.launches == 2          # the seed gradient (a fill), the backward's replay
    torch.testing.assert_close(loss, loss_of(x).detach())
    torch.testing.assert_close(w.grad, x * torch.cos(x * w.detach()))
    assert bench_ops.captured(loss_of, compile=False, device="cuda") is loss_of
