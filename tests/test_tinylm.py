"""Tests for tinylm.py: each one checks against an independent oracle (LoRA merged into the
frozen weights by hand, PyTorch's own causal attention, a loop of single-example backward passes,
a hand-written argmax loop, F.cross_entropy on hand-picked positions, algebraic identities such
as "B = 0 changes nothing").

Run:  python -m pytest tests/test_tinylm.py -q
"""

import copy
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import data  # noqa: E402
import tinylm  # noqa: E402

RANK, ALPHA, LORA_SEED = 2, 8.0, 1234   # scale alpha / r = 4




def tiny_gpt(seed=0, n_layer=2, n_head=2, n_embd=16):
    torch.manual_seed(seed)
    cfg = tinylm.GPTConfig(vocab_size=257, block_size=16, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd)
    return tinylm.GPT(cfg).eval()


def lora_gpt(seed=0, **kw):
    return tinylm.add_lora(tiny_gpt(seed, **kw), rank=RANK, alpha=ALPHA, seed=LORA_SEED)


def random_update(model, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tinylm.update_shape(model.cfg, RANK), generator=g) * std


def random_idx(B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (B, T), generator=g)


def lora_params_by_name(model):
    return {n: p for n, p in model.named_parameters() if "lora" in n}


# -----------------------------------------------------------------------------
# LoRA: B = 0 is the identity; otherwise it is the merged weight W + (alpha/r) B A


@pytest.mark.lora_forward
def test_lora_layer_is_the_low_rank_weight_delta():
    # oracle: the merged weight (alpha/r) B (A0 + dA) applied with F.linear; B = 0 gives exactly 0
    lora = tinylm.LoRA(16, 12, RANK, ALPHA, torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lora.dA.normal_(generator=torch.Generator().manual_seed(2))
        assert torch.equal(lora(x), torch.zeros(2, 5, 12))
        lora.B.normal_(generator=torch.Generator().manual_seed(3))
        expected = F.linear(x, (ALPHA / RANK) * lora.B @ (lora.A0 + lora.dA))
        assert lora(x).shape == (2, 5, 12)
        assert torch.allclose(lora(x), expected, rtol=1e-5, atol=1e-6)


def test_lora_with_B_zero_changes_nothing():
    model = tiny_gpt()
    idx = random_idx()
    before, _ = model(idx)
    tinylm.add_lora(model, rank=RANK, alpha=ALPHA, seed=LORA_SEED)
    after, _ = model(idx)
    assert torch.allclose(before, after, rtol=0, atol=1e-6)

    # a nonzero dA with every B still 0: the delta B (A0 + dA) is still 0
    u = random_update(model)
    C, r = model.cfg.n_embd, RANK
    u[:, r * C: 2 * r * C] = 0   # q_B
    u[:, 3 * r * C:] = 0         # v_B
    tinylm.set_update(model, u)
    assert any(p.abs().sum() > 0 for n, p in lora_params_by_name(model).items() if n.endswith("dA"))
    after_dA, _ = model(idx)
    assert torch.allclose(before, after_dA, rtol=0, atol=1e-6)


@pytest.mark.update_vector
def test_fresh_lora_model_has_zero_update():
    # the update vector is A - A0 and B - 0: nothing trained means all zeros (not A0)
    model = lora_gpt()
    u = tinylm.get_update(model)
    assert u.shape == tinylm.update_shape(model.cfg, RANK)
    assert torch.equal(u, torch.zeros_like(u))


def test_lora_delta_is_the_merged_weight():
    # one layer: q_proj(x) + q_lora(x) == x (W + (alpha/r) B (A0 + dA))^T + b
    model = lora_gpt()
    tinylm.set_update(model, random_update(model))
    attn = model.blocks[1].attn
    for proj, lora in ((attn.q_proj, attn.q_lora), (attn.v_proj, attn.v_lora)):
        merged = nn.Linear(proj.in_features, proj.out_features)
        with torch.no_grad():
            merged.weight.copy_(proj.weight + (ALPHA / RANK) * lora.B @ (lora.A0 + lora.dA))
            merged.bias.copy_(proj.bias)
        x = torch.randn(2, 5, proj.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.allclose(proj(x) + lora(x), merged(x), rtol=1e-5, atol=1e-6)


def test_whole_model_with_lora_equals_base_with_lora_merged_into_q_and_v():
    base = tiny_gpt()
    merged = copy.deepcopy(base)
    model = tinylm.add_lora(base, rank=RANK, alpha=ALPHA, seed=LORA_SEED)
    idx = random_idx()
    base_logits, _ = model(idx)
    tinylm.set_update(model, random_update(model))
    with torch.no_grad():
        for blk, mblk in zip(model.blocks, merged.blocks):
            a = blk.attn
            mblk.attn.q_proj.weight += (ALPHA / RANK) * a.q_lora.B @ (a.q_lora.A0 + a.q_lora.dA)
            mblk.attn.v_proj.weight += (ALPHA / RANK) * a.v_lora.B @ (a.v_lora.A0 + a.v_lora.dA)
        lora_logits, _ = model(idx)
        merged_logits, _ = merged(idx)
    assert (lora_logits - base_logits).abs().max() > 1e-3   # the update does something ...
    assert torch.allclose(lora_logits, merged_logits, rtol=1e-4, atol=1e-5)   # ... the right thing


def test_attention_matches_pytorch_causal_sdpa():
    model = lora_gpt()
    tinylm.set_update(model, random_update(model))
    attn, H = model.blocks[0].attn, model.cfg.n_head
    x = torch.randn(2, 7, model.cfg.n_embd, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        B, T, C = x.shape
        q = attn.q_proj(x) + attn.q_lora(x)
        k = attn.k_proj(x)
        v = attn.v_proj(x) + attn.v_lora(x)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, C))
        assert torch.allclose(attn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.causal_attention
@pytest.mark.parametrize("T", [1, 7, 16])
def test_attention_alone_matches_pytorch_causal_sdpa(T):
    torch.manual_seed(0)
    attn = tinylm.SelfAttention(tinylm.GPTConfig(block_size=16, n_head=4, n_embd=32)).eval()
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        q, k, v = (proj(x).view(2, T, 4, 8).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # (B, n_head, T, head_dim)
        expected = attn.o_proj(y.transpose(1, 2).reshape(2, T, 32))
        assert torch.allclose(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_add_lora_freezes_the_base_and_trains_only_dA_and_B():
    model = lora_gpt()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{l}.attn.{w}_lora.{m}" for l in range(model.cfg.n_layer)
                for w in ("q", "v") for m in ("dA", "B")}
    assert set(trainable) == expected
    assert sum(p.numel() for p in trainable.values()) == math.prod(tinylm.update_shape(model.cfg, RANK))
    assert [id(p) for p in tinylm.lora_parameters(model)] == [
        id(trainable[f"blocks.{l}.attn.{w}_lora.{m}"])
        for l in range(model.cfg.n_layer) for w in ("q", "v") for m in ("dA", "B")]
    # A0 is public and fixed: a buffer, not a parameter
    assert all("A0" not in n for n, _ in model.named_parameters())
    # a backward pass reaches only the LoRA parameters
    tinylm.set_update(model, random_update(model))
    idx = random_idx()
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n
    with pytest.raises(ValueError):
        tinylm.add_lora(model, rank=RANK, alpha=ALPHA, seed=LORA_SEED)


def test_A0_is_recreated_from_the_seed():
    def A0s(model):
        return [b for n, b in model.named_buffers() if n.endswith("A0")]

    # different base weights, different global RNG state: same seed -> same A0
    m1 = tinylm.add_lora(tiny_gpt(seed=0), rank=RANK, alpha=ALPHA, seed=7)
    torch.randn(100)
    m2 = tinylm.add_lora(tiny_gpt(seed=1), rank=RANK, alpha=ALPHA, seed=7)
    m3 = tinylm.add_lora(tiny_gpt(seed=0), rank=RANK, alpha=ALPHA, seed=8)
    a1, a2, a3 = A0s(m1), A0s(m2), A0s(m3)
    assert len(a1) == 2 * m1.cfg.n_layer
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert all(not torch.equal(x, y) for x, y in zip(a1, a3))
    assert all(x.abs().sum() > 0 for x in a1)
    assert not torch.equal(a1[0], a1[1])   # q and v get their own A0


# -----------------------------------------------------------------------------
# update vectors: exact round trip, documented layout, bad input refused


@pytest.mark.update_vector
def test_update_round_trip_is_exact():
    model = lora_gpt()
    u = random_update(model, seed=3)
    tinylm.set_update(model, u)
    assert torch.equal(tinylm.get_update(model), u)


def test_update_round_trip_after_training_reproduces_the_model():
    model = lora_gpt()
    opt = torch.optim.Adam(tinylm.lora_parameters(model), lr=1e-2)
    idx = random_idx(B=8, T=12)
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    u = tinylm.get_update(model)
    assert u.abs().sum() > 0
    other = lora_gpt()
    tinylm.set_update(other, u)
    assert torch.equal(tinylm.get_update(other), u)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], other(idx)[0])


@pytest.mark.update_vector
def test_update_layout_is_qA_qB_vA_vB():
    model = lora_gpt()
    L, C, r = model.cfg.n_layer, model.cfg.n_embd, RANK
    targets = {0: ("q_lora.dA", (0, 0)), r * C: ("q_lora.B", (0, 0)),
               2 * r * C: ("v_lora.dA", (0, 0)), 3 * r * C: ("v_lora.B", (0, 0)),
               r * C - 1: ("q_lora.dA", (r - 1, C - 1)), 4 * r * C - 1: ("v_lora.B", (C - 1, r - 1))}
    for l in range(L):
        for pos, (name, ij) in targets.items():
            u = torch.zeros(tinylm.update_shape(model.cfg, r))
            u[l, pos] = 1.0
            tinylm.set_update(model, u)
            nonzero = [(n, tuple(i.tolist())) for n, p in lora_params_by_name(model).items()
                       for i in p.nonzero()]
            assert nonzero == [(f"blocks.{l}.attn.{name}", ij)], (l, pos)


@pytest.mark.update_vector
def test_get_update_reads_each_entry_where_the_layout_says():
    # the mirror image of the test above: one LoRA entry set by hand, one position in the vector
    model = lora_gpt()
    L, C, r = model.cfg.n_layer, model.cfg.n_embd, RANK
    params = lora_params_by_name(model)
    for l in range(L):
        for name, ij, pos in (("q_lora.dA", (1, 2), C + 2), ("q_lora.B", (3, 1), r * C + 3 * r + 1),
                              ("v_lora.dA", (0, C - 1), 2 * r * C + C - 1), ("v_lora.B", (C - 1, 0), 4 * r * C - r)):
            with torch.no_grad():
                for p in params.values():
                    p.zero_()
                params[f"blocks.{l}.attn.{name}"][ij] = 1.0
            u = tinylm.get_update(model)
            assert u.shape == (L, 4 * r * C) and u.dtype == torch.float32
            assert u.nonzero().tolist() == [[l, pos]], (l, name)


@pytest.mark.update_vector
def test_split_update_gives_views_that_gradients_flow_through():
    # train.py differentiates the LLM's loss w.r.t. a predicted update through split_update
    model = lora_gpt()
    C, r = model.cfg.n_embd, RANK
    u = torch.zeros(tinylm.update_shape(model.cfg, r), requires_grad=True)
    tensors = tinylm.split_update(model, u)
    assert {n: t.shape for n, t in tensors.items()} == {n: p.shape for n, p in lora_params_by_name(model).items()}
    tensors["blocks.1.attn.q_lora.B"].sum().backward()
    expected = torch.zeros_like(u)
    expected[1, r * C: 2 * r * C] = 1.0
    assert torch.equal(u.grad, expected)


@pytest.mark.parametrize("bad,error,match", [
    ("wrong shape", ValueError, "shape"),
    ("int dtype", ValueError, "float"),
    ("nan", ValueError, "NaN"),
    ("inf", ValueError, "inf"),
    ("list", (TypeError, ValueError), "Tensor"),
    ("numpy", (TypeError, ValueError), "Tensor"),
])
def test_set_update_refuses_bad_input(bad, error, match):
    model = lora_gpt()
    good = random_update(model)
    tinylm.set_update(model, good)
    shape = tinylm.update_shape(model.cfg, RANK)
    u = {"wrong shape": torch.zeros(shape[0], shape[1] + 1),
         "int dtype": torch.zeros(shape, dtype=torch.long),
         "nan": good.clone().index_put_((torch.tensor(1), torch.tensor(3)), torch.tensor(float("nan"))),
         "inf": good.clone().index_put_((torch.tensor(0), torch.tensor(5)), torch.tensor(float("inf"))),
         "list": good.tolist(),
         "numpy": good.numpy().copy()}[bad]
    with pytest.raises(error, match=match):
        tinylm.set_update(model, u)
    assert torch.equal(tinylm.get_update(model), good)   # refused before writing anything


def test_update_io_on_a_model_without_lora_is_refused_clearly():
    # fail early with a message saying what is wrong (here: no LoRA adapters yet)
    model = tiny_gpt()
    u = torch.zeros(tinylm.update_shape(model.cfg, RANK))
    with pytest.raises((TypeError, ValueError), match=r"(?i)lora"):
        tinylm.set_update(model, u)
    with pytest.raises((TypeError, ValueError), match=r"(?i)lora"):
        tinylm.get_update(model)


# -----------------------------------------------------------------------------
# the forward pass: masked loss, causality, per-sample gradients, generation


@pytest.mark.masked_cross_entropy
def test_masked_cross_entropy_on_made_up_logits():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(3, 5, 7, generator=g), torch.randint(7, (3, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    sel = mask.bool()
    expected = F.cross_entropy(logits[sel], targets[sel])          # the 4 masked positions only
    assert torch.allclose(tinylm.masked_cross_entropy(logits, targets, mask), expected, atol=1e-6)
    every = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(tinylm.masked_cross_entropy(logits, targets), every, atol=1e-6)
    # by hand: uniform logits over 7 classes cost log 7 per token; an empty mask costs 0, not nan
    assert tinylm.masked_cross_entropy(torch.zeros(3, 5, 7), targets, mask).item() == pytest.approx(math.log(7))
    assert tinylm.masked_cross_entropy(logits, targets, torch.zeros(3, 5)).item() == 0.0


def test_masked_loss_is_cross_entropy_over_masked_positions_only():
    model = lora_gpt()
    tinylm.set_update(model, random_update(model))
    idx = random_idx(B=4, T=11, seed=5)
    x, y = idx[:, :-1], idx[:, 1:]
    g = torch.Generator().manual_seed(6)
    mask = (torch.rand(x.shape, generator=g) < 0.3).float()
    mask[0, 0] = 1.0
    with torch.no_grad():
        logits, loss = model(x, y, mask)
        sel = mask.bool()
        expected = F.cross_entropy(logits[sel], y[sel])
        assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
        # no mask: every position counts
        _, loss_all = model(x, y)
        assert torch.allclose(loss_all, F.cross_entropy(logits.flatten(0, 1), y.flatten()),
                              rtol=1e-6, atol=1e-6)
        assert not torch.allclose(loss, loss_all)


def test_attention_is_causal():
    model = lora_gpt()
    tinylm.set_update(model, random_update(model))
    idx = random_idx(B=2, T=12, seed=7)
    with torch.no_grad():
        ref, _ = model(idx)
        for t in range(idx.size(1)):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 257
            out, _ = model(changed)
            assert torch.equal(out[:, :t], ref[:, :t]), t
            assert not torch.allclose(out[:, t], ref[:, t]), t


def test_per_sample_grads_with_torch_func_match_single_example_backward():
    model = lora_gpt()
    tinylm.set_update(model, random_update(model, std=0.2))
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss_fn(p, x, y, m):
        _, loss = functional_call(model, (p, frozen), (x[None], y[None], m[None]))
        return loss

    idx = random_idx(B=4, T=10, seed=8)
    x, y = idx[:, :-1], idx[:, 1:]
    mask = torch.zeros(x.shape)
    mask[:, 4:] = 1.0
    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0, 0))(params, x, y, mask)
    for i in range(x.size(0)):
        model.zero_grad()
        _, loss = model(x[i:i + 1], y[i:i + 1], mask[i:i + 1])
        loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad.abs().sum() > 0, n
                assert torch.allclose(per_sample[n][i], p.grad, rtol=1e-4, atol=1e-6), (n, i)


@pytest.mark.per_example_grads
def test_lora_per_example_grads_match_a_loop_of_backward_passes():
    # oracle: the layer's formula written out here, one autograd backward per example
    lora = tinylm.LoRA(12, 10, RANK, ALPHA, torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lora.dA.normal_(generator=g)
        lora.B.normal_(generator=g)
    x = torch.randn(4, 6, 12, generator=g, dtype=torch.float64)
    grad_out = torch.randn(4, 6, 10, generator=g, dtype=torch.float64)
    grads = lora.per_example_grads(x, grad_out)
    assert set(grads) == {"dA", "B"}
    for i in range(len(x)):
        lora.zero_grad()
        out = (x[i] @ (lora.A0 + lora.dA).T) @ lora.B.T * (ALPHA / RANK)   # (T, n_out)
        out.backward(grad_out[i])
        assert grads["dA"][i].shape == lora.dA.shape and grads["B"][i].shape == lora.B.shape
        assert torch.allclose(grads["dA"][i], lora.dA.grad, rtol=1e-10, atol=1e-12), i
        assert torch.allclose(grads["B"][i], lora.B.grad, rtol=1e-10, atol=1e-12), i


def test_greedy_generate_is_an_argmax_loop():
    model = lora_gpt()
    tinylm.set_update(model, random_update(model, std=1.0))
    prompt = random_idx(B=3, T=5, seed=9)
    out = model.generate(prompt, max_new_tokens=8)
    idx = prompt
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    assert torch.equal(out[:, :5], prompt)


# -----------------------------------------------------------------------------
# checkpoints


def test_save_load_round_trip(tmp_path):
    base = tiny_gpt(seed=3)
    idx = random_idx()
    with torch.no_grad():
        base_logits, _ = base(idx)
    model = tinylm.add_lora(base, rank=RANK, alpha=ALPHA, seed=LORA_SEED)
    u = random_update(model)
    tinylm.set_update(model, u)
    path = str(tmp_path / "model.pt")
    tinylm.save_model(model, path)
    assert not os.path.exists(path + ".tmp")

    ckpt = torch.load(path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "lora" in k.lower() or "A0" in k]

    loaded = tinylm.load_model(path)
    assert loaded.cfg == model.cfg
    assert loaded.lora is None
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], base_logits)          # the base, without the update
        tinylm.add_lora(loaded, rank=RANK, alpha=ALPHA, seed=LORA_SEED)
        tinylm.set_update(loaded, u)
        assert torch.equal(loaded(idx)[0], model(idx)[0])        # same A0, same update: same model


@pytest.mark.parametrize("corruption", ["truncated", "random bytes", "foreign object"])
def test_load_model_rejects_corrupt_files(tmp_path, corruption):
    path = str(tmp_path / "model.pt")
    tinylm.save_model(tiny_gpt(), path)
    if corruption == "truncated":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
    elif corruption == "random bytes":
        open(path, "wb").write(np.random.default_rng(0).bytes(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=re.escape(path)):
        tinylm.load_model(path)


# -----------------------------------------------------------------------------
# training works: pretraining and LoRA fine-tuning both lower the loss


@pytest.fixture(scope="module")
def pretrained():
    """A tiny GPT pretrained by tinylm.pretrain, 60 steps at lr 1e-2 on the public corpus: (model, first, last loss)."""
    enc = data.get_tokenizer()
    cfg = tinylm.GPTConfig(vocab_size=enc.n_vocab, block_size=data.BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32)
    held_out = data.encode_lines(data.pretrain_lines(256, np.random.default_rng(123)), enc)
    torch.manual_seed(0)
    with torch.no_grad():
        first = tinylm.GPT(cfg)(*held_out)[1].item()    # the init pretrain starts from (seed 0)
    corpus = data.encode_lines(data.pretrain_lines(60 * 32, np.random.default_rng(0)), enc)
    indices = torch.arange(60 * 32).view(60, 32)   # line after line, 32 a step

    def rows_of(idx):
        return tuple(t[idx] for t in corpus)
    model = tinylm.pretrain(cfg, rows_of, indices, lr=1e-2, seed=0)
    with torch.no_grad():
        last = model(*held_out)[1].item()
    return model, first, last


def test_pretrain_is_seeded_and_reads_one_batch_per_step_in_order():
    cfg = tinylm.GPTConfig(vocab_size=20, block_size=6, n_layer=1, n_head=2, n_embd=8)
    x = torch.randint(20, (40, 6), generator=torch.Generator().manual_seed(0))

    def run(seed, steps=7):
        calls = []

        def rows_of(idx):   # the rows idx (8,) of x: batch i of 5 fixed ones, in turn
            calls.append(idx)
            return x[idx], x[idx].roll(-1, 1), torch.ones(8, 6)
        indices = torch.arange(steps * 8).view(steps, 8) % 40
        model = tinylm.pretrain(cfg, rows_of, indices, lr=1e-2, seed=seed)
        assert len(calls) == steps and not model.training
        assert all(torch.equal(i, j) for i, j in zip(calls, indices))
        return model.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["wte.weight"], other["wte.weight"])


def test_pretraining_lowers_the_held_out_loss(pretrained):
    _, first, last = pretrained
    assert first > math.log(257) - 0.5     # starts near uniform over the vocabulary
    assert last < first - 1.0


def test_lora_finetune_lowers_the_answer_loss_and_leaves_the_base_alone(pretrained):
    enc = data.get_tokenizer()
    model = copy.deepcopy(pretrained[0])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tinylm.add_lora(model, rank=4, alpha=8.0, seed=LORA_SEED)
    _, private = data.split_pairs(0)
    skewed = np.array([0.88, 0.04, 0.04, 0.04])     # mostly '+', the easiest operator
    train, test = data.client_data(private, skewed, 256, 256, seed=0, index=0)
    xtr, ytr, mtr = data.encode_lines(train, enc)
    held_out = data.encode_lines(test, enc)
    with torch.no_grad():
        before = model(*held_out)[1].item()
    opt = torch.optim.Adam(tinylm.lora_parameters(model), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        i = torch.randint(len(train), (32,), generator=g)
        _, loss = model(xtr[i], ytr[i], mtr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(*held_out)[1].item()
    assert after < before - 0.05, (before, after)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())


def test_exact_match_counts_examples_with_every_masked_token_right():
    """Oracle: a model whose logits we write by hand -- right everywhere except where we plant
    mistakes. A mistake on a masked (answer) token loses its example; one outside the mask does not.
    (The metric lives in eval.py; the models it scores are these.)"""
    import eval as evaluation
    task = data.make_task("arith", 0)
    x, y, mask = task.encode(task.public_examples(40, np.random.default_rng(0)))
    logits = torch.zeros(*y.shape, task.enc.n_vocab).scatter_(2, y[..., None], 1.0)   # (N, T, V): right
    for i in range(0, 40, 4):                             # 10 examples: a wrong answer token
        t = mask[i].nonzero()[-1].item()
        logits[i, t] = 0.0
        logits[i, t, (y[i, t] + 1) % task.enc.n_vocab] = 1.0
    for i in range(1, 40, 4):                             # 10 others: a wrong token in the question
        logits[i, 0] = 0.0
        logits[i, 0, (y[i, 0] + 1) % task.enc.n_vocab] = 1.0
    assert mask[1::4, 0].sum() == 0                       # (the question is never masked)

    class HandWritten(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(1, 1)
        def forward(self, idx):
            rows = [next(j for j in range(len(x)) if torch.equal(x[j], r)) for r in idx]
            return logits[rows], None

    assert evaluation.exact_match_of(HandWritten(), x, y, mask) == pytest.approx(30 / 40)
    assert evaluation.exact_match_of(HandWritten(), x, y, mask, batch=7) == pytest.approx(30 / 40)


def test_adaptive_confidence_is_guo_et_al_per_token_by_hand():
    """vissup's loss (Guo et al. 2024): per token, beta = e^CE(own) / (e^CE(own) + e^CE(weak)), its
    warm-up over the first 25% of steps, then (1 - beta) CE(weak) + beta CE(own), meaned over the
    masked tokens. The oracle: the same sums, token by token, with math."""
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [1.0, 1.0, 3.0]]])   # (1, 3, vocab 3)
    y, mask = torch.tensor([[1, 0, 2]]), torch.tensor([[1, 1, 0]])
    def by_hand(warm):
        total = 0.0
        for t in range(2):                                               # the masked tokens
            row = logits[0, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            weak, own = log_z - row[y[0, t]], log_z - max(row)
            beta = warm * math.exp(own) / (math.exp(own) + math.exp(weak))
            total += (1 - beta) * weak + beta * own
        return total / 2
    for step, warm in ((1, 0.4), (5, 1.0)):                              # 10 steps: warm-up over 2.5
        adaptive = tinylm.Recipe(steps=10, confidence="adaptive")
        got = tinylm.with_confidence(logits, y, mask, None, adaptive, step).item()
        assert got == pytest.approx(by_hand(warm), rel=1e-6)
    # a fixed weight is Burns et al.'s: (1 - w) loss + w CE(own), untouched by the new branch
    loss = tinylm.masked_cross_entropy(logits, y, mask)
    assert tinylm.with_confidence(logits, y, mask, loss, tinylm.Recipe(steps=10), 5) is loss


def test_set_update_is_one_copy_into_a_buffer_the_lora_tensors_view():
    # the oracle: the per-tensor write set_update used to do (split_update, then p.copy_(t) each)
    model = lora_gpt()
    u = random_update(model)
    tinylm.set_update(model, u)
    flat = model.lora_flat
    storage = flat.untyped_storage().data_ptr()                          # views of one buffer:
    assert all(p.untyped_storage().data_ptr() == storage for p in tinylm.lora_parameters(model))
    expected = copy.deepcopy(model)   # a deepcopy clones the parameters: they no longer view it
    with torch.no_grad():
        for p, t in zip(tinylm.lora_parameters(expected), tinylm.split_update(expected, u).values()):
            p.copy_(t)
    assert torch.equal(flat, u.flatten())
    assert all(torch.equal(p, q) for p, q in zip(tinylm.lora_parameters(model),
                                                   tinylm.lora_parameters(expected)))
    v = random_update(model) * 3
    tinylm.set_update(expected, v)                     # rebuilt for the copy, the original untouched
    assert torch.equal(tinylm.get_update(expected), v) and torch.equal(tinylm.get_update(model), u)
    assert expected.lora_flat.data_ptr() != flat.data_ptr()
    # training writes through the views: the buffer always holds the current update
    opt = torch.optim.SGD(tinylm.lora_parameters(model), lr=0.1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    opt.step()
    assert torch.equal(model.lora_flat, tinylm.get_update(model).flatten())
    assert not torch.equal(model.lora_flat, u.flatten())


def test_set_update_can_skip_only_the_finite_check():
    model = lora_gpt()
    bad = torch.full(tinylm.update_shape(model.cfg, RANK), float("nan"))
    tinylm.set_update(model, bad, check_finite=False)    # the code's own update: written as it is
    assert tinylm.get_update(model).isnan().all()
    with pytest.raises(ValueError, match="shape"):      # shape and dtype are always checked
        tinylm.set_update(model, bad[:, 1:], check_finite=False)


def test_writing_an_update_is_one_copy_and_without_the_finite_check_no_host_sync():
    # the operators set_update dispatches, counted: one copy_ (not one per LoRA tensor), and a read
    # back to the host (_local_scalar_dense, what .item() and `if tensor:` run) only with the check
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))
    model = lora_gpt()
    u = random_update(model)
    tinylm.set_update(model, u)            # the first write builds the flat buffer
    for check, synced in ((False, False), (True, True)):
        ops = []
        with Recorder():
            tinylm.set_update(model, u, check_finite=check)
        assert sum(op.startswith("copy_") for op in ops) == 1
        assert any(op.startswith("_local_scalar_dense") for op in ops) == synced
