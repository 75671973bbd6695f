"""Tests for data.py: each one checks against an independent oracle (Python's own UTF-8 bytes,
hand-made arithmetic examples, the answers recomputed from the operands, set algebra on the
operand pairs, the law of large numbers for the operator mixtures).

Run:  python -m pytest tests/test_data.py -q
"""

import math
import os
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tiktoken
import torch

import data  # noqa: E402

ALL_PAIRS = {(a, b) for a in range(10, 100) for b in range(10, 100)}   # 8100 two-digit pairs


def parse_line(line):
    """'37@52=>52\\n' -> (37, '@', 52, 52), by position (every line has the same layout)."""
    return int(line[0:2]), line[2], int(line[3:5]), int(line[7:-1])


def op_of(line):
    """The operator index a line names after '=' (checked against its answer, computed here)."""
    a, _, b, ans = parse_line(line)
    op = "+-><".index(line[6])
    assert ans == [a + b, abs(a - b), max(a, b), min(a, b)][op], line
    return op


def op_frequencies(lines):
    ops = [op for op in map(op_of, lines) if op is not None]
    assert len(ops) > 0.9 * len(lines)
    return np.bincount(ops, minlength=4) / len(ops)


# -----------------------------------------------------------------------------
# tokenizer


TEXTS = ["37@52=52\n", "", "a\nb\n\n", "héllo wörld — ünïcödé\n日本語 🙂\r\n\ttabs", "\x00\xff\n"]


def test_byte_tokenizer_is_utf8_bytes_and_never_touches_the_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default tokenizer must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    enc = data.get_tokenizer()
    assert enc.n_vocab == 257
    assert enc.eot_token == 256
    for text in TEXTS:
        tokens = enc.encode(text)
        assert tokens == list(text.encode("utf-8")), text    # one token per UTF-8 byte
        assert enc.decode(tokens) == text
    assert enc.encode(data.EOT, allowed_special="all") == [256]
    assert enc.decode([256]) == data.EOT


# -----------------------------------------------------------------------------
# the arith task: lines, answers, parsing


@pytest.mark.parametrize("a,b,answers", [
    (37, 52, [89, 15, 52, 37]),
    (52, 37, [89, 15, 52, 37]),
    (10, 10, [20, 0, 10, 10]),
    (99, 98, [197, 1, 99, 98]),
    (40, 20, [60, 20, 40, 20]),
])
def test_make_line_hand_examples(a, b, answers):
    for op, (symbol, ans) in enumerate(zip(data.OPS, answers)):
        assert data.make_line(a, b, op) == f"{a}@{b}={symbol}{ans}\n"
        assert data.make_line(a, b, op, symbol) == f"{a}{symbol}{b}={symbol}{ans}\n"
    assert data.OPS == ["+", "-", ">", "<"]


def test_every_line_has_the_answer_marker_at_PROMPT_LEN():
    assert data.PROMPT_LEN == 5
    for a, b in sorted(ALL_PAIRS):
        for op in range(4):
            for symbol in (None, data.OPS[op]):
                line = data.make_line(a, b, op, symbol)
                assert line.index("=") == data.PROMPT_LEN
                assert line[:data.PROMPT_LEN] == f"{a}{symbol or '@'}{b}"
                assert line[data.PROMPT_LEN + 1] == data.OPS[op]       # the operator it applies
                assert line.endswith("\n") and line[data.PROMPT_LEN + 2:-1].isdigit()
    # and the longest line fits the model's context
    enc = data.get_tokenizer()
    assert len(enc.encode(data.make_line(99, 99, 0))) - 1 <= data.BLOCK_SIZE


@pytest.mark.parametrize("text,expected", [
    ("=52\n", 52), ("37@52=52\n", 52), ("=089", 89), ("=0", 0), ("=12x3", 12),
    ("=1=2", 1), ("52", None), ("", None), ("=", None), ("=\n12", None), ("=x12", None),
    ("= 12", None), ("=-5", 5), ("=>52\n", 52), ("37@52=<37\n", 37), ("=+", None),
    ("=@5", None), ("=+-5", None),
])
def test_parse_answer(text, expected):
    assert data.parse_answer(text) == expected


def test_parse_answer_of_non_ascii_digits_is_none_not_a_crash():
    # model output is decoded bytes: '=' then the UTF-8 of '²' (0xC2 0xB2) is a possible output.
    # str.isdigit() accepts '²' but int('²') raises: only ASCII digits are an answer.
    assert data.parse_answer("=\u00b2") is None
    assert data.parse_answer("=4\u00b2") == 4


# -----------------------------------------------------------------------------
# batches


def test_encode_lines_shifts_by_one_and_masks_exactly_the_answer():
    enc = data.get_tokenizer()
    lines = ["37@52=>52\n", "10-10=-0\n", "99+99=+198\n", "40<20=<20\n"]
    x, y, mask = data.encode_lines(lines, enc)
    T = max(len(line) for line in lines) - 1
    assert x.shape == y.shape == mask.shape == (len(lines), T)
    assert x.dtype == y.dtype == torch.long
    for i, line in enumerate(lines):
        n = len(line) - 1                                    # real positions of this row
        b = list(line.encode())
        assert x[i, :n].tolist() == b[:-1]
        assert y[i, :n].tolist() == b[1:]                    # next-token targets
        assert set(mask[i].tolist()) <= {0.0, 1.0}
        assert enc.decode(y[i][mask[i] == 1].tolist()) == line[data.PROMPT_LEN:]   # '=52\n'
        assert mask[i, n:].sum() == 0                        # padding never counts
        assert mask[i, :data.PROMPT_LEN - 1].sum() == 0      # the question never counts
    with pytest.raises(ValueError):
        data.encode_lines(["1" * (data.BLOCK_SIZE + 2)], enc)


def test_prompt_is_the_question_and_scoring_reads_the_number():
    task = data.ArithTask(0)
    lines = [data.make_line(a, b, op) for a, b, op in [(37, 52, 0), (52, 37, 1), (11, 90, 3)]]
    assert [task.prompt(line) for line in lines] == ["37@52", "52@37", "11@90"]
    assert all(len(task.enc.encode(task.prompt(line))) == data.PROMPT_LEN for line in lines)
    assert all(task.is_correct(line, line[data.PROMPT_LEN:]) for line in lines)      # its own answer
    assert task.is_correct(lines[0], "=>89 and more") and task.is_correct(lines[0], "=89")   # the number counts
    assert not task.is_correct(lines[0], "=+88\n") and not task.is_correct(lines[0], "89\n")


@pytest.mark.parametrize("completion,expected", [
    ("=>52\nxyz", "37@52=>52\n"), ("=52", "37@52=52\n"), ("=-5=7", "37@52=-5\n"),
    ("=@52", None), (" =52", None), ("=+", None), ("", None), ("=\u00b2", None),
])
def test_relabelled_keeps_only_an_answer_in_the_task_format(completion, expected):
    assert data.ArithTask(0).relabelled("37@52", completion) == expected


# -----------------------------------------------------------------------------
# who holds what: public / private split, shadow subsets, clients, pretraining corpus


def test_split_pairs_partitions_all_pairs_deterministically():
    public, private = data.split_pairs(0)
    pub, priv = set(public), set(private)
    assert len(pub) == len(public) and len(priv) == len(private)    # no duplicates
    assert not pub & priv
    assert pub | priv == ALL_PAIRS
    assert 0.45 < len(pub) / len(ALL_PAIRS) < 0.55
    assert data.split_pairs(0) == (public, private)
    public1, private1 = data.split_pairs(1)
    assert set(public1) | set(private1) == ALL_PAIRS and not set(public1) & set(private1)
    assert set(public1) != pub
    assert 0.3 < len(set(public1) & pub) / len(pub) < 0.7           # a fresh coin per pair


def shadow_subsets(seed, k, n, alpha):
    task = data.ArithTask(seed)
    return task, [task.shadow_subset(i, n, alpha) for i in range(k)]


def test_shadow_subsets_use_only_public_pairs_and_are_seeded():
    task, subsets = shadow_subsets(seed=3, k=6, n=300, alpha=2.0)
    pub = set(task.public)
    for mixture, lines in subsets:
        assert len(lines) == 300
        pairs = [(a, b) for a, _, b, _ in map(parse_line, lines)]
        assert set(pairs) <= pub
        assert len(set(pairs)) == len(pairs)                 # distinct operand pairs
        assert all(line[2] == "@" for line in lines)
        assert mixture.shape == (4,) and (mixture >= 0).all()
        assert mixture.sum() == pytest.approx(1.0, abs=1e-9)
    mixtures = [m for m, _ in subsets]
    assert all(not np.allclose(m1, m2) for i, m1 in enumerate(mixtures) for m2 in mixtures[i + 1:])

    _, again = shadow_subsets(seed=3, k=6, n=300, alpha=2.0)
    assert all(np.array_equal(m1, m2) and l1 == l2 for (m1, l1), (m2, l2) in zip(subsets, again))
    _, other = shadow_subsets(seed=4, k=6, n=300, alpha=2.0)
    assert all(not np.array_equal(m1, m2) and l1 != l2 for (m1, l1), (m2, l2) in zip(subsets, other))


def test_a_dp_draw_holds_fresh_records_of_its_subsets_mixture():
    # each DP draw of a shadow subset stands for a client of that convention with records of its own
    task = data.ArithTask(3)
    n_public = len(task.public)
    own = task.shadow_subset(2, n_public, 0.5)
    draws = [task.shadow_subset(2, n_public, 0.5, draw=r) for r in range(3)]
    pub = set(task.public)
    for mixture, lines in draws:
        assert np.array_equal(mixture, own.mixture)                   # the same convention
        assert {(a, b) for a, _, b, _ in map(parse_line, lines)} <= pub
        assert np.abs(op_frequencies(lines) - mixture).max() < 0.035
        assert lines != own.examples
    assert draws[0].examples != draws[1].examples != draws[2].examples
    assert task.shadow_subset(2, n_public, 0.5, draw=1).examples == draws[1].examples   # seeded
    assert task.shadow_subset(2, n_public, 0.5).examples == own.examples      # no draw: unchanged


def test_the_answer_tests_noise_only_records_are_public_lines_of_the_task_mixture():
    # what a client whose data holds no convention of its own has: the provider makes it from
    # public pairs alone, each noise-only upload from records of its own
    task = data.ArithTask(3)
    cfg = SimpleNamespace(seed=3, n_train=len(task.public))
    runs = [data.null_examples(cfg, task, i) for i in range(3)]
    pub = set(task.public)
    for lines in runs:
        assert len(lines) == cfg.n_train
        assert {(a, b) for a, _, b, _ in map(parse_line, lines)} <= pub
        assert np.abs(op_frequencies(lines) - data.TASK_MIXTURE).max() < 0.035
    assert runs[0] != runs[1] != runs[2]
    assert data.null_examples(cfg, task, 1) == runs[1]                       # seeded
    assert data.null_examples(SimpleNamespace(seed=4, n_train=cfg.n_train), task, 1) != runs[1]


def test_shadow_lines_follow_their_own_mixture():
    n_public = len(data.ArithTask(5).public)
    for mixture, lines in shadow_subsets(seed=5, k=3, n=n_public, alpha=2.0)[1]:
        # ~4000 lines: the standard error of each frequency is below 0.008
        assert np.abs(op_frequencies(lines) - mixture).max() < 0.035, mixture


def test_shadow_mixtures_are_centred_on_the_task_mixture():
    mixtures = np.array([m for m, _ in shadow_subsets(seed=0, k=400, n=1, alpha=2.0)[1]])
    # Dirichlet(alpha * m) has mean m; with alpha = 2 each coordinate's sd is <= 0.29, / sqrt(400)
    assert np.abs(mixtures.mean(0) - data.TASK_MIXTURE).max() < 0.06
    assert mixtures.std(0).min() > 0.05                      # spread out, not all equal to m


def test_task_mixture_is_a_non_uniform_distribution():
    m = data.TASK_MIXTURE
    assert m.shape == (4,) and (m > 0).all() and m.sum() == pytest.approx(1.0)
    assert m.max() - m.min() > 0.1    # a uniform mixture leaves IID clients nothing to learn


def test_client_mixtures_default_and_custom():
    task = data.ArithTask(0)
    clients = task.clients(10, 10)
    assert [c["kind"] for c in clients] == ["skewed"] * 4 + ["iid"]
    assert [c["name"] for c in clients] == ["skewed_+", "skewed_-", "skewed_>", "skewed_<", "iid_0"]
    for op, c in enumerate(clients[:4]):
        expected = np.full(4, 0.12 / 3)
        expected[op] = 0.88
        np.testing.assert_allclose(c["mixture"], expected, atol=1e-12)
        assert sum(c["mixture"]) == pytest.approx(1.0, abs=1e-12)
    assert clients[4]["mixture"] == data.TASK_MIXTURE.tolist()

    skewed = [c["mixture"] for c in task.clients(10, 10, skew=0.7) if c["kind"] == "skewed"]
    assert [int(np.argmax(m)) for m in skewed] == [0, 1, 2, 3]
    assert all(max(m) == pytest.approx(0.7) and sum(m) == pytest.approx(1.0) for m in skewed)


def test_client_data_is_private_disjoint_and_seeded():
    public, private = data.split_pairs(0)
    priv = set(private)
    mix = np.array([0.88, 0.04, 0.04, 0.04])
    train, test = data.client_data(private, mix, 300, 200, seed=5, index=1)
    assert len(train) == 300 and len(test) == 200
    train_pairs = [(a, b) for a, _, b, _ in map(parse_line, train)]
    test_pairs = [(a, b) for a, _, b, _ in map(parse_line, test)]
    assert set(train_pairs) | set(test_pairs) <= priv
    assert len(set(train_pairs)) == 300 and len(set(test_pairs)) == 200
    assert not set(train_pairs) & set(test_pairs)
    assert all(line[2] == "@" for line in train + test)

    assert data.client_data(private, mix, 300, 200, seed=5, index=1) == (train, test)
    assert data.client_data(private, mix, 300, 200, seed=5, index=2)[0] != train
    assert data.client_data(private, mix, 300, 200, seed=6, index=1)[0] != train

    whole = data.client_data(private, mix, len(private) - 10, 10, seed=5, index=1)   # the whole pool
    assert len({line[:5] for line in whole[0]}) == len(private) - 10
    with pytest.raises(ValueError, match="n_test"):
        data.client_data(private, mix, 10, len(private), seed=5, index=1)


def test_a_client_larger_than_the_pool_repeats_training_pairs_never_test_pairs():
    public, private = data.split_pairs(0)
    mix = np.array([0.1, 0.1, 0.1, 0.7])
    whole = data.client_data(private, mix, len(private) - 200, 200, seed=5, index=1)
    train, test = data.client_data(private, mix, 3 * len(private), 200, seed=5, index=1)
    assert len(train) == 3 * len(private) and test == whole[1]
    assert train[:len(whole[0])] == whole[0]                      # every distinct pair first, then repeats
    train_pairs = [(a, b) for a, _, b, _ in map(parse_line, train)]
    assert len(set(train_pairs)) == len(private) - 200            # every other pair, some several times
    assert not set(train_pairs) & {(a, b) for a, _, b, _ in map(parse_line, test)}
    ops = np.array([op_of(line) for line in train])
    assert np.bincount(ops, minlength=4) / len(ops) == pytest.approx(mix, abs=0.02)


def test_client_lines_follow_the_client_mixture():
    for c in data.ArithTask(0).clients(2400, 1500):
        mix = np.array(c["mixture"])
        assert np.abs(op_frequencies(c["train"]) - mix).max() < 0.035
        assert np.abs(op_frequencies(c["test"]) - mix).max() < 0.045    # same mixture on the test split


@pytest.mark.parametrize("explicit_frac", [0.6, 0.2])
def test_pretrain_lines_mix_explicit_and_ambiguous(explicit_frac):
    lines = data.pretrain_lines(4000, np.random.default_rng(0), explicit_frac=explicit_frac)
    assert len(lines) == 4000
    explicit = [line for line in lines if line[2] in data.OPS]
    ambiguous = [line for line in lines if line[2] == "@"]
    assert len(explicit) + len(ambiguous) == len(lines)
    assert abs(len(explicit) / len(lines) - explicit_frac) < 0.03
    for line in explicit:                                    # explicit lines are right ...
        a, symbol, b, ans = parse_line(line)
        assert ans == data.OP_FUNCS[data.OPS.index(symbol)](a, b), line
        assert line == data.make_line(a, b, data.OPS.index(symbol), symbol)
    # ... and '@' carries no convention: each operator about a quarter of the time
    assert np.abs(op_frequencies(ambiguous) - 0.25).max() < 0.05
    assert len({(a, b) for a, _, b, _ in map(parse_line, lines)}) > 2500   # all over the pairs
    assert data.pretrain_lines(50, np.random.default_rng(1)) == data.pretrain_lines(50, np.random.default_rng(1))


def test_pretrain_corpus_has_every_problem_once_explicit_and_once_ambiguous():
    explicit, ambiguous = data.pretrain_corpus()
    assert len(explicit) == len(ambiguous) == 4 * len(ALL_PAIRS)
    problems = set()
    for e, q in zip(explicit, ambiguous):
        a, symbol, b, ans = parse_line(e)
        op = data.OPS.index(symbol)
        assert ans == data.OP_FUNCS[op](a, b)
        assert q == e[:2] + "@" + e[3:]                       # aligned: the same problem with '@'
        problems.add((a, b, op))
    assert len(problems) == 4 * len(ALL_PAIRS)


def test_convention_groups_give_every_member_its_own_disjoint_data():
    task = data.ArithTask(0)
    members = task.clients(n_train=100, n_test=50, group_size=3)
    assert [m["group"] for m in members] == [g for g in ["skewed_+", "skewed_-", "skewed_>", "skewed_<", "iid_0"]
                                             for _ in range(3)]
    assert len({m["index"] for m in members}) == 15
    private = set(task.private)
    for m in members:
        train = {parse_line(line)[0::2] for line in m["train"]}     # operand pairs (a, b)
        test = {parse_line(line)[0::2] for line in m["test"]}
        assert not train & test                          # a member never tests on its training pairs
        assert train | test <= private                   # and holds private pairs only
    assert members[0]["train"] != members[1]["train"]     # members of a group hold different data
    assert task.clients(100, 50, group_size=1)[0]["train"] == members[0]["train"]   # member 0 = the single client


def test_streams_keep_the_seeds_every_cached_stage_was_made_with():
    """The named streams are the numbers written out before they had names: a cached stage stays valid."""
    assert data.run_seed(7, "shadow run", 3) == 1_000_003 * 7 + 3
    assert data.run_seed(7, "client run", 5) == 2_000_003 * 7 + 5
    assert data.run_seed(7, "shadow DP draw", 3, 2) == 3_000_017 * 7 + 1_009 * 3 + 2
    for name, key in (("client data", [7, 2, 5]), ("public examples", [7, 4]), ("run split", [7, 3])):
        index = key[2:]
        assert data.stream(7, name, *index).integers(1 << 30) == np.random.default_rng(key).integers(1 << 30)


def test_runs_of_one_seed_never_share_a_torch_seed():
    # a shared seed means the same batches and the same DP noise: at seed 0 a client's upload once
    # carried exactly the noise of one of the provider's shadow DP draws
    for seed in range(4):
        seeds = ([data.run_seed(seed, "shadow run", k) for k in range(256)]
                 + [data.run_seed(seed, "shadow DP draw", k, r) for k in range(256) for r in range(16)]
                 + [data.run_seed(seed, name, i) for name in ("client run", "audit client", "audit setting")
                    for i in range(256)])
        assert len(set(seeds)) == len(seeds), seed
    assert data.run_seed(0, "client run", 5) == -2_000_003 + 5 != data.run_seed(0, "shadow run", 5)


def test_random_clients_are_seeded_apart_from_the_shadow_draws_and_leave_the_others_alone():
    task = data.make_task("arith", 0)
    clients = task.clients(16, 8, n_random=3)
    again = data.make_task("arith", 0).clients(16, 8, n_random=3)
    randoms = [c for c in clients if c["kind"] == "random"]
    assert [c["mixture"] for c in randoms] == [c["mixture"] for c in again if c["kind"] == "random"]
    assert [c["mixture"] for c in randoms] != [c["mixture"] for c in data.make_task("arith", 1).clients(
        16, 8, n_random=3) if c["kind"] == "random"]
    assert len({tuple(c["mixture"]) for c in randoms}) == 3 and all(abs(sum(c["mixture"]) - 1) < 1e-9 for c in randoms)
    # a stream of their own: no shadow subset (the provider's draws) has a random client's mixture
    shadow = [tuple(task.shadow_subset(k, 4, 0.5).mixture) for k in range(64)]
    assert not {tuple(c["mixture"]) for c in randoms} & set(shadow)
    # adding them changes nothing for the skewed and IID clients (same indices, same data)
    assert task.clients(16, 8) == clients[:5]
    assert [c["index"] for c in randoms] == [5, 6, 7] and [c["group"] for c in randoms] == ["random_0", "random_1", "random_2"]


def test_pairs_between_runs_are_their_mean_with_the_noise_of_one_input():
    g = torch.Generator().manual_seed(0)
    runs, sd = 12, 0.5
    X_clean, Y = torch.randn(runs, 3, 4, generator=g), torch.randn(runs, 2, 5, generator=g)
    noise = sd * torch.randn(20000, 3, 4, generator=g)                  # draws of the noise alone
    X = X_clean + noise[:runs]                                           # one noisy input per run
    between = data.between_runs(X, Y, noise, 40, seed=3)
    a, b = between.runs[:, 0], between.runs[:, 1]
    assert len({tuple(p) for p in between.runs.tolist()}) == 40 and (a < b).all() and b.max() < runs
    torch.testing.assert_close(between.Y, (Y[a] + Y[b]) / 2)
    # the input: the mean of the two runs' inputs plus a noise draw / sqrt(2), nothing else
    top_up = (between.X - (X[a] + X[b]) / 2) * math.sqrt(2)
    nearest = (top_up[:, None] - noise[None]).abs().flatten(2).amax(2).amin(1)   # (40,)
    assert nearest.max().item() < 1e-5
    # so its noise is one input's, not the sqrt(2) smaller noise of a mean of two
    many = data.between_runs(torch.zeros(300, 3, 4) + noise[:300], torch.zeros(300, 2, 5), noise, 5000, 1)
    assert many.X.std().item() == pytest.approx(sd, rel=0.05)
    # seeded: the same pairs again, other pairs at another seed
    assert np.array_equal(data.between_runs(X, Y, noise, 40, seed=3).runs, between.runs)
    assert not np.array_equal(data.between_runs(X, Y, noise, 40, seed=4).runs, between.runs)


def test_noise_copies_keep_a_runs_signal_with_one_uploads_noise():
    g = torch.Generator().manual_seed(1)
    runs, P, sd, copies = 6, 4, 0.5, 3000
    signal, Y = 3 * torch.randn(runs, 1, 3, 4, generator=g), torch.randn(runs, 2, 5, generator=g)
    noise = sd * torch.randn(20000, 3, 4, generator=g)
    X = signal + sd * torch.randn(runs, P, 3, 4, generator=g)            # P DP inputs per run
    more = data.noise_copies(X, Y, noise, copies, seed=0)
    assert more.X.shape == (runs * copies, 3, 4) and (more.runs[:, 0] == np.repeat(np.arange(runs), copies)).all()
    torch.testing.assert_close(more.Y, Y.repeat_interleave(copies, 0))
    per_run = more.X.view(runs, copies, 3, 4)
    # centred on the mean of the run's own inputs; spread: one upload's noise, neither less nor more
    torch.testing.assert_close(per_run.mean(1), X.mean(1), atol=0.05, rtol=0)
    deviation = per_run - X.mean(1, keepdim=True)
    assert deviation.std().item() == pytest.approx(sd * math.sqrt(1 - 1 / P), rel=0.03)
    total = per_run - signal                                                 # noise in all
    assert total.std().item() == pytest.approx(sd, rel=0.1)


def test_extra_pairs_hold_both_kinds_in_the_configured_numbers():
    from config.presets import Config
    X, Y, noise = torch.randn(10, 4, 3, 4), torch.randn(10, 2, 5), torch.randn(100, 3, 4)
    extra = data.extra_pairs(Config(gt_mixup=0.5, gt_noise_copies=2), X, Y, noise)
    assert len(extra.X) == len(extra.Y) == len(extra.runs) == 20 + 20
    assert (extra.runs[:20, 0] < extra.runs[:20, 1]).all() and (extra.runs[20:, 0] == extra.runs[20:, 1]).all()
    assert len(data.extra_pairs(Config(gt_mixup=0, gt_noise_copies=0), X, Y, noise).X) == 0
