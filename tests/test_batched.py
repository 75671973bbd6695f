"""Tests for the batched paths of tinylm.py: `finetune_many` against a loop of the per-run
`finetune` (the oracle: each run's snapshots, same seed), `loss_of_updates` (and train.py's
selection criterion on it) against a loop of set_update + loss_of, and the random streams against
draws made by hand.

Run:  python -m pytest tests/test_batched.py -q
"""

import pytest
import torch

import data
import dp
import tinylm
import train
from eval import exact_match_of

RANK = 2
STEPS, SNAPSHOTS = 12, (3, 8, 12)


def lora_gpt(seed=0):
    torch.manual_seed(seed)
    cfg = tinylm.GPTConfig(vocab_size=257, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return tinylm.add_lora(tinylm.GPT(cfg), rank=RANK, alpha=8.0, seed=1234)


def examples(N, T, seed):
    """(x, y, mask) (N, T): random tokens, a different number of answer tokens per example."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(257, (N, T), generator=g), torch.randint(257, (N, T), generator=g)
    answer = torch.randint(1, T // 2, (N, 1), generator=g)                  # (N, 1) answer lengths
    return x, y, (torch.arange(T) >= T - answer).float()


# three runs of different sizes: N_k and T_k differ, so finetune_many has to pad both
DATASETS = [examples(20, 10, 1), examples(7, 8, 2), examples(33, 12, 3)]
SEEDS = [11, 12, 13]


def relative_differences(many, one_by_one):
    return [((a - b).norm() / b.norm()).item() for run_a, run_b in zip(many, one_by_one)
            for a, b in zip(run_a, run_b)]


def assert_runs_equal_their_own_finetune(recipe, datasets=DATASETS, seeds=SEEDS):
    model = lora_gpt()
    many = tinylm.finetune_many(model, datasets, recipe, seeds, snapshot_steps=SNAPSHOTS)
    one_by_one = [tinylm.finetune(model, *d, recipe, s, snapshot_steps=SNAPSHOTS)
                  for d, s in zip(datasets, seeds)]
    assert [len(run) for run in many] == [len(SNAPSHOTS)] * len(datasets)
    assert all(u.shape == one_by_one[0][0].shape and u.abs().max() > 0 for run in many for u in run)
    assert max(relative_differences(many, one_by_one)) < 1e-4
    return many


def test_plain_runs_equal_their_own_finetune():
    many = assert_runs_equal_their_own_finetune(tinylm.Recipe(steps=STEPS, batch=8, lr=1e-2))
    # the runs are different runs: each got its own data and its own batches
    assert not torch.allclose(many[0][-1], many[2][-1])


def test_finetune_many_leaves_the_model_as_it_was():
    model = lora_gpt()
    tinylm.set_update(model, 0.1 * torch.ones(tinylm.update_shape(model.cfg, RANK)))
    before = tinylm.get_update(model)
    tinylm.finetune_many(model, DATASETS[:2], tinylm.Recipe(steps=2, batch=4), SEEDS[:2])
    assert torch.equal(tinylm.get_update(model), before)


def test_dp_runs_with_uneven_poisson_batches_equal_their_own_finetune():
    # q = 0.2 on N = 7, 20, 33: expected batches 1.4, 4 and 6.6, so some steps sample nobody in the
    # smallest run while the largest samples a dozen: every step pads, some runs entirely
    recipe = tinylm.Recipe(steps=STEPS, lr=1e-2, dp_sigma=0.6, dp_clip=0.5, dp_sample_rate=0.2)
    datasets, seeds = [DATASETS[1], DATASETS[0], DATASETS[2]], SEEDS
    sizes = [[len(i) for i in data.draw_run(recipe, len(d[0]), s, 1)[0]]
             for d, s in zip(datasets, seeds)]
    assert 0 in sizes[0] and max(sizes[2]) >= 2 * max(sizes[0]) > 0    # the case this test is for
    assert_runs_equal_their_own_finetune(recipe, datasets=datasets, seeds=seeds)


def test_each_dp_run_divides_by_its_own_expected_batch_size():
    # Adam undoes any constant scale of the gradient -- unless the gradient is as small as Adam's
    # eps (1e-8). With C = 1e-9 it is, so the snapshots depend on each run's q*N_k: 1.4, 4, 6.6
    recipe = tinylm.Recipe(steps=STEPS, lr=1e-2, dp_sigma=0.6, dp_clip=1e-9, dp_sample_rate=0.2)
    assert_runs_equal_their_own_finetune(recipe)


def test_a_step_where_no_run_samples_anyone_is_noise_alone():
    recipe = tinylm.Recipe(steps=STEPS, lr=1e-2, dp_sigma=0.6, dp_clip=0.5, dp_sample_rate=0.05)
    datasets = [examples(N, 8, seed=N) for N in (3, 4, 5)]
    sizes = torch.tensor([[len(i) for i in data.draw_run(recipe, len(d[0]), s, 1)[0]]
                          for d, s in zip(datasets, SEEDS)])                  # (K, steps)
    assert (sizes.sum(0) == 0).any() and (sizes.sum(0) > 0).any()   # both kinds of step occur
    assert_runs_equal_their_own_finetune(recipe, datasets=datasets)


def test_draw_run_draws_in_the_order_finetune_always_has():
    # the oracle: one generator per run, per step randint for a plain batch; with DP rand(N) < q
    # for the Poisson sample and then randn(D) for the noise
    plain, private = tinylm.Recipe(steps=4, batch=5), tinylm.Recipe(steps=4, dp_sigma=1.0,
                                                                   dp_sample_rate=0.3)
    g = torch.Generator().manual_seed(7)
    expected = [torch.randint(9, (5,), generator=g) for _ in range(4)]
    indices, noise = data.draw_run(plain, 9, 7, 6)
    assert noise is None and all(torch.equal(a, b) for a, b in zip(indices, expected))
    g = torch.Generator().manual_seed(7)
    expected = [((torch.rand(9, generator=g) < 0.3).nonzero().squeeze(1), torch.randn(6, generator=g))
                for _ in range(4)]
    indices, noise = data.draw_run(private, 9, 7, 6)
    assert all(torch.equal(i, e[0]) for i, e in zip(indices, expected))
    assert torch.equal(noise, torch.stack([e[1] for e in expected]))


def test_a_padded_example_has_exactly_zero_gradient():
    # finetune_many pads a run's batch with examples whose mask it sets to 0: their loss is 0/1, so
    # their gradient is exactly 0 and they add nothing to the clipped sum (rows of zeros)
    model = lora_gpt()
    tinylm.set_update(model, 0.3 * torch.randn(tinylm.update_shape(model.cfg, RANK),
                                               generator=torch.Generator().manual_seed(0)))
    x, y, mask = examples(4, 10, seed=4)
    mask[1:3] = 0                                                       # two padded examples
    losses = dp.per_example_losses(model(x)[0], y, mask)                # (4,)
    params = tinylm.lora_parameters(model)
    flat = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, params,
                                                                            retain_graph=True)])
                        for loss in losses])                            # (4, D), one backward each
    assert torch.equal(flat[1:3], torch.zeros_like(flat[1:3])) and (flat[[0, 3]].norm(dim=1) > 0).all()
    noise = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(1))
    padded, _ = dp.clip_and_noise(flat, 0.05, 0.5, 3.0, noise)
    alone, _ = dp.clip_and_noise(flat[[0, 3]], 0.05, 0.5, 3.0, noise)
    assert torch.allclose(padded, alone, rtol=1e-6, atol=1e-9)


def test_loss_of_updates_equals_a_loop_of_set_update_and_loss_of():
    model = lora_gpt()
    g = torch.Generator().manual_seed(5)
    updates = 0.5 * torch.randn(5, *tinylm.update_shape(model.cfg, RANK), generator=g)
    datasets = [DATASETS[u % 3] for u in range(5)]
    before = tinylm.get_update(model)
    # max_tokens = 2 datasets' worth: three chunks of updates
    losses = tinylm.loss_of_updates(model, updates, datasets, max_tokens=2 * 33 * 12)
    assert torch.equal(tinylm.get_update(model), before)                 # the model was not touched
    loop = [tinylm.loss_of(tinylm.set_update(model, u), *d) for u, d in zip(updates, datasets)]
    assert losses.shape == (5,)
    assert losses.tolist() == pytest.approx(loop, rel=1e-5)
    assert len(set(loop)) == 5


@pytest.mark.parametrize("measure", ["loss", "exact_match"])
def test_selection_criterion_spreads_a_runs_examples_over_its_draws(measure):
    """A run's score with D inputs: the mean over draws j of the measure of update j on the run's
    examples j, j + D, ...; with one input per run, on all of its examples."""
    model = lora_gpt()
    g = torch.Generator().manual_seed(6)
    D, runs = 3, [2, 0]
    updates = 0.5 * torch.randn(2, D, *tinylm.update_shape(model.cfg, RANK), generator=g)
    criterion = train.functional_criterion(model, DATASETS, measure)

    def measured(update, x, y, mask):
        tinylm.set_update(model, update)
        return tinylm.loss_of(model, x, y, mask) if measure == "loss" else 1 - exact_match_of(model, x, y, mask)
    spread = [sum(measured(updates[i, j], *(t[j::D] for t in DATASETS[r])) for j in range(D)) / D
              for i, r in enumerate(runs)]
    assert criterion(updates, runs).tolist() == pytest.approx(spread, rel=1e-5)
    whole = [measured(updates[i, 0], *DATASETS[r]) for i, r in enumerate(runs)]
    assert criterion(updates[:, 0], runs).tolist() == pytest.approx(whole, rel=1e-5)
    assert criterion(updates[:, :1], runs).tolist() == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda m, r: tinylm.finetune_many(m, [], r, []), "K > 0"),
    (lambda m, r: tinylm.finetune_many(m, DATASETS, r, SEEDS[:2]), r"\[20, 7, 33\] .* 2 seeds"),
    (lambda m, r: tinylm.finetune_many(m, [DATASETS[0], (DATASETS[0][0][:0],) * 3], r, [1, 2]),
     r"N > 0 .* \[20, 0\] examples"),
    (lambda m, r: tinylm.loss_of_updates(m, torch.zeros(2, 2, 64), DATASETS), "and 2 updates"),
    (lambda m, r: tinylm.loss_of_updates(m, torch.zeros(3, 2, 60), DATASETS), "expected shape"),
])
def test_bad_input_is_refused_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call(lora_gpt(), tinylm.Recipe(steps=2))


def test_the_adaptive_confidence_loss_batched_equals_one_by_one():
    """vissup's loss (per-token weights) under vmap: each run equals its own finetune."""
    assert_runs_equal_their_own_finetune(tinylm.Recipe(steps=STEPS, batch=8, lr=1e-2,
                                                       confidence="adaptive"))
