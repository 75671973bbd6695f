"""
data.py -- the tokenizer, the arith task, and who holds which data: no downloads, no data files,
everything generated from a seed.

The arith task is an *operator convention* task. Lines look like

    37+52=+89     explicit operators: + add, - |a-b|, > max, < min
    37@52=>52     '@' is ambiguous: it stands for one of the four operators

After the answer marker '=' the model names the operator it applies, then the result (scored on the
number). Pretraining (public) shows explicit lines and '@' lines with a uniformly random meaning.
Each organization writes '@' with its own *convention*, a mixture over the operators: fine-tuning on
its data teaches it, and the larger model, which computes better, gains more from it.

    operand pairs (a, b) --hash--> PUBLIC pool (the provider's shadow data) | PRIVATE pool (clients)
    shadow subset k: public pairs, operators from its own mixture ~ Dirichlet(alpha * m)
    client: private pairs, operators from its mixture (IID: the task mixture m; skewed: ~88% one
            operator), with its own disjoint test split drawn from the same mixture

The `text` task (experiments/text.py) is language modeling on kinds of text -- code, comments, the
language reference -- rare in the base models' general prose (or on the sections of your file): the
same roles, with a kind of text instead of a convention.

    python -c "import data; print(data.make_task('arith', 0).clients(3, 2)[0])"  # a client
    python -m pytest -q tests/test_data.py
"""
import hashlib
import math
import operator
import re
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

import dp

# -----------------------------------------------------------------------------
# random streams: each kind of draw has a stream of its own, so changing one stage never moves
# another's draws. numpy draws come from [seed, stream, *index]; a fine-tuning run takes one
# integer torch seed: a large prime times the seed, plus its weighted indices.

STREAMS = {"pretrain batches": 0, "shadow subset": 1, "client data": 2, "run split": 3,
           "public examples": 4, "random clients": 5, "audit canaries": 7, "audit prompts": 8,
           "shadow subset draw": 9, "between runs": 10,
           "noise copies": 11, "kd prompts": 12, "check prompts": 13, "null records": 14}
RUN_SEEDS = {"shadow run": (1_000_003, 1), "client run": (2_000_003, 1),
             "shadow DP draw": (3_000_017, 1_009, 1), "audit client": (5_000_011, 1),
             "audit setting": (6_000_007, 1), "kd candidate": (7_000_003, 1),
             "null run": (8_000_009, 1)}


def stream(seed, name, *index):
    """The numpy Generator of one stream, e.g. stream(seed, "shadow subset", k)."""
    return np.random.default_rng([seed, STREAMS[name], *index])


def run_seed(seed, name, *index):
    """The torch seed of one run, e.g. run_seed(seed, "shadow DP draw", k, r) = 3_000_017 * seed
    + 1_009 * k + r. Seed 0 counts as -1: a scale times 0 would leave the indices alone, and client
    i, shadow run i and DP draw (0, i) would share one seed: the same batches, the same DP noise."""
    scale, *weights = RUN_SEEDS[name]
    return scale * (seed or -1) + sum(w * i for w, i in zip(weights, index))

# -----------------------------------------------------------------------------
# tokenizer: a tiktoken Encoding built from our own ranks (no network, tiny vocabulary)

EOT = "<|endoftext|>"


def get_tokenizer(name="bytes"):
    """The 256 single bytes (all of them, or tiktoken panics) + EOT. Another name ("gpt2") needs the
    network."""
    if name != "bytes":
        return tiktoken.get_encoding(name)
    return tiktoken.Encoding(name="gradtx-bytes", pat_str=r"[^\n]+|\n",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={EOT: 256})


def digest(strings):
    """A short fingerprint of generated data: stage caches are keyed by it, so they cannot go
    stale."""
    return hashlib.sha1(b"".join(s.encode() + b"\x00" for s in strings)).hexdigest()[:12]


# -----------------------------------------------------------------------------
# the arith task: lines, the pools of operand pairs, the pretraining corpus


def absolute_difference(a, b):
    """What '-' means in this task: |a - b|, so that every answer is a natural number."""
    return abs(a - b)


OPS = ["+", "-", ">", "<"]                     # add, |a-b|, max, min
OP_FUNCS = [operator.add, absolute_difference, max, min]
# '=', the operator it names (if any), ASCII digits only
ANSWER = r"=[-+><]?([0-9]+)"
# the overall convention m (not uniform, or IID clients learn nothing)
TASK_MIXTURE = np.array([0.5, 0.2, 0.15, 0.15])
RANDOM_ALPHA = 2.0      # random clients' mixtures ~ Dirichlet(RANDOM_ALPHA * m): spread, not pure
NEAR_MEAN_ALPHA = 20.0  # near-mean shadow subsets' mixtures ~ Dirichlet(20 m): close to m
PAIRS = [(a, b) for a in range(10, 100) for b in range(10, 100)]   # operands: always 2 digits
# "37@52": '=' at the same position in every line, whatever the operator (absolute positions)
PROMPT_LEN = 5
ANSWER_LEN = 6      # "=+198\n" at most
BLOCK_SIZE = 16


def make_line(a, b, op, symbol=None):
    """One problem as text: '37@52=>52\\n' (symbol defaults to the ambiguous '@')."""
    return f"{a}{symbol or '@'}{b}={OPS[op]}{OP_FUNCS[op](a, b)}\n"


def parse_answer(text):
    """The integer after the first '=' (and the operator it names), or None, i.e. a score of 0.
    [0-9], not str.isdigit(): model output is decoded bytes, and int() refuses the '²' that
    isdigit() accepts."""
    answer = re.match(r"[^=]*" + ANSWER, text)
    return int(answer.group(1)) if answer else None


def split_pairs(seed):
    """PUBLIC / PRIVATE operand pairs, disjoint by construction: a hash of (seed, a, b) decides."""
    public = {(a, b) for a, b in PAIRS
              if hashlib.sha256(f"{seed}:{a}:{b}".encode()).digest()[0] % 2 == 0}
    return [p for p in PAIRS if p in public], [p for p in PAIRS if p not in public]


def lines_from(pairs, mixture, n, rng):
    """n '@' lines on distinct operand pairs, operators drawn from `mixture`."""
    idx = rng.choice(len(pairs), size=n, replace=n > len(pairs))
    ops = rng.choice(len(OPS), size=n, p=mixture)
    return [make_line(*pairs[i], op) for i, op in zip(idx, ops)]


def client_data(private_pairs, mixture, n_train, n_test, seed, index):
    """A client's private train lines and its own test lines; no test pair ever occurs in its
    training lines.

    Up to the pool's size every line has its own operand pair. A larger client (the paper's clients
    hold ~8k records; the private pool has ~4k pairs) repeats pairs of its TRAINING part, each
    record with its own operator drawn from the mixture, so it holds more evidence of its
    convention, never its test pairs."""
    if n_test >= len(private_pairs):
        raise ValueError(f"n_test = {n_test} leaves no operand pair of the private pool "
                         f"({len(private_pairs)} pairs) for training: expected n_test < "
                         f"{len(private_pairs)}")
    rng = stream(seed, "client data", index)
    order = rng.permutation(len(private_pairs))
    # training pairs seen once each
    n_distinct = min(n_train, len(private_pairs) - n_test)
    ops = rng.choice(len(OPS), size=n_distinct + n_test, p=mixture)
    lines = [make_line(*private_pairs[i], op) for i, op in zip(order, ops)]
    train = lines[:n_distinct]
    test = lines[n_distinct:]
    # more records than distinct pairs
    if n_train > n_distinct:
        again = rng.choice(order[:n_distinct], size=n_train - n_distinct)
        train += [make_line(*private_pairs[i], op)
                  for i, op in zip(again, rng.choice(len(OPS), size=len(again), p=mixture))]
    return train, test


def pretrain_corpus():
    """(explicit_lines, ambiguous_lines), aligned: every problem once with its operator, once with
    '@'. The web text that taught a public checkpoint arithmetic: no organization's convention
    (uniform over operators)."""
    problems = [(a, b, op) for a, b in PAIRS for op in range(len(OPS))]
    return ([make_line(a, b, op, OPS[op]) for a, b, op in problems],
            [make_line(a, b, op) for a, b, op in problems])


def pretrain_indices(n, rng, n_problems, explicit_frac=0.6):
    """n random line indices into explicit_lines + ambiguous_lines: explicit with prob
    explicit_frac."""
    idx = rng.integers(n_problems, size=n)
    return np.where(rng.random(n) < explicit_frac, idx, n_problems + idx)


def pretrain_lines(n, rng, explicit_frac=0.6):
    """n lines drawn from the pretraining corpus (a convenience for small experiments)."""
    explicit, ambiguous = pretrain_corpus()
    corpus = explicit + ambiguous
    return [corpus[i] for i in pretrain_indices(n, rng, len(explicit), explicit_frac)]


def encode_lines(lines, enc, block_size=BLOCK_SIZE, first_target=PROMPT_LEN - 1, pad=False):
    """Lines of either task -> x, y (N, T) next-token pairs and mask (N, T): 1 on each line's
    targets from y[:, first_target] on, 0 on the EOT padding behind a short line; T: the longest
    line's length - 1, or block_size with pad. Arith: y[:, PROMPT_LEN - 1] is the '=', so the loss
    is on '=', the answer and '\\n'."""
    rows = [enc.encode_ordinary(line) for line in lines]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    longest = max(lengths, default=1) - 1
    if longest > block_size:
        raise ValueError(f"an example has {longest + 1} tokens, more than block_size + 1 = "
                         f"{block_size + 1}")
    T = block_size if pad else longest
    tokens = np.full((len(rows), T + 1), enc.eot_token, dtype=np.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    pos = np.arange(T)[None, :]
    mask = (pos >= first_target) & (pos < lengths[:, None] - 1)
    tokens = torch.from_numpy(tokens)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(mask).float()


def random_mixture(seed, i):
    """Random client i's convention: a point of the simplex ~ Dirichlet(RANDOM_ALPHA * m), around
    the task mixture m but anywhere, corners and centre alike."""
    return stream(seed, "random clients", i).dirichlet(RANDOM_ALPHA * TASK_MIXTURE)


def is_near_mean(k, share):
    """Whether shadow subset k is one of the near-mean ones: `share` of the subsets, spread evenly
    over k = 0, 1, 2, ... (every 4th at 0.25), so that any first K subsets hold about share * K."""
    return int((k + 1) * share) > int(k * share)


class Subset(NamedTuple):
    """A shadow subset: the mixture it was drawn with (operators, or kinds of text) and its
    examples."""
    mixture: np.ndarray
    examples: list


class ArithTask:
    """The arith task for one seed, with all that train.py and eval.py ask of a task (the text task
    has the same interface). A model is scored on a line by generating `completion_len` tokens after
    `prompt(line)`."""
    name = "arith"
    metric = "accuracy"
    higher_is_better = True
    block_size = BLOCK_SIZE
    completion_len = ANSWER_LEN
    label_temperature = 0.0      # relabelling is greedy: a weak model's own best answer

    def __init__(self, seed):
        self.seed = seed
        self.enc = get_tokenizer()
        self.public, self.private = split_pairs(seed)
        self.explicit, self.ambiguous = pretrain_corpus()
        # {device: the encoded corpus}, made on first use
        self._corpus = {}

    def fingerprint(self):
        """A digest of the pretraining corpus: part of pretraining's cache key."""
        return digest(self.explicit + self.ambiguous)

    def encode(self, examples):
        """Lines -> x, y, mask (N, T), as `encode_lines` makes them."""
        return encode_lines(examples, self.enc)

    def pretrain_batch(self, n, rng, device="cpu"):
        """n pretraining lines, on `device`: one step's `pretrain_draws`, its `pretrain_rows`."""
        return self.pretrain_rows(self.pretrain_draws(n, 1, rng, device)[0])

    def pretrain_draws(self, n, steps, rng, device="cpu"):
        """(steps, n) line indices into the corpus, every step's drawn up front from rng in step
        order (the numbers a draw per step gives), then copied to `device` once; the encoded
        corpus goes there too, before any step runs."""
        self.corpus_on(device)
        idx = np.stack([pretrain_indices(n, rng, len(self.explicit)) for _ in range(steps)])
        return torch.from_numpy(idx).to(device)

    def pretrain_rows(self, idx):
        """The lines idx (B,) as x, y, mask (B, T), on idx's device: one gather (no copy from the
        host)."""
        return tuple(t[idx] for t in self.corpus_on(idx.device))

    def corpus_on(self, device):
        """The encoded corpus x, y, mask (2 * n_problems, T) on `device`, encoded on first use."""
        if str(device) not in self._corpus:
            self._corpus[str(device)] = tuple(t.to(device)
                                              for t in self.encode(self.explicit + self.ambiguous))
        return self._corpus[str(device)]

    def shadow_subset(self, k, n, alpha, near_mean=0.0, draw=None):
        """A Subset of public pairs, operators from a mixture ~ Dirichlet(alpha * m): around m,
        spread to reach any client's (mostly near-pure for alpha < 1); a `near_mean` share of the
        subsets ~ Dirichlet(NEAR_MEAN_ALPHA * m) instead, close to m, where IID clients sit.
        draw r: the same mixture, fresh records (DP draw r's, as each client holds its own)."""
        rng = stream(self.seed, "shadow subset", k)
        mixture = rng.dirichlet((NEAR_MEAN_ALPHA if is_near_mean(k, near_mean) else alpha)
                                * TASK_MIXTURE)
        if draw is not None:
            rng = stream(self.seed, "shadow subset draw", k, draw)
        return Subset(mixture, lines_from(self.public, mixture, n, rng))

    def public_examples(self, n, rng):
        """n public lines that follow the task mixture m (n=None: one per public pair)."""
        return lines_from(self.public, TASK_MIXTURE, n or len(self.public), rng)

    def clients(self, n_train, n_test, group_size=1, skew=0.88, n_random=0):
        """Convention groups of group_size members: one SKEWED group per operator (a share `skew` of
        it) and the IID group (mixture m); then n_random clients of their own at RANDOM points of
        the simplex, mixtures ~ Dirichlet(RANDOM_ALPHA * m) from a stream of their own (no shadow
        subset's draw). Member i's private data depends on (seed, i) only."""
        skewed = np.full((len(OPS), len(OPS)), (1 - skew) / (len(OPS) - 1))   # row op: op's mixture
        np.fill_diagonal(skewed, skew)
        groups = ([(f"skewed_{op}", "skewed", mix, group_size) for op, mix in zip(OPS, skewed)]
                  + [("iid_0", "iid", TASK_MIXTURE, group_size)]
                  + [(f"random_{i}", "random", random_mixture(self.seed, i), 1)
                     for i in range(n_random)])
        members = []
        for group, kind, mixture, size in groups:
            for j in range(size):
                train, test = client_data(self.private, mixture, n_train, n_test, self.seed,
                                          len(members))
                members.append({"name": group if size == 1 else f"{group}/{j}",
                                "group": group, "kind": kind, "index": len(members),
                                "mixture": mixture.tolist(), "train": train, "test": test})
        return members

    def prompt(self, example):
        """What a model is given to answer: the line up to its '=' ('37@52')."""
        return example[:PROMPT_LEN]

    # what an answer can read '@' as: the token after its '=' (gradtx's answer test reads a model's
    # probabilities of these; a task without conventions to read has no such test)
    conventions = tuple(OPS)

    def convention_prompt(self, example):
        """The prompt up to the token that names the answer's operator ('37@52=')."""
        return self.prompt(example) + "="

    def is_correct(self, example, completion):
        """Whether the completion's number is the line's answer (the operator it names is not
        scored)."""
        return parse_answer(completion) == parse_answer(example)

    def relabelled(self, prompt, completion):
        """The prompt answered by a model's completion, or None when it does not start with an
        answer."""
        answer = re.match(ANSWER, completion)
        return prompt + answer.group(0) + "\n" if answer else None


# -----------------------------------------------------------------------------
# runs: a fine-tune's random draws, runs side by side, and the shadow runs a fit learns from


def draw_run(recipe, n, seed, n_noise, device="cpu"):
    """A run's random draws, up front and in its steps' order, from its own CPU generator (a GPU run
    draws what a CPU run does): randint(n, (batch,)), or with DP a Poisson sample then N(0, 1) noise
    (n_noise,). Copied to `device` once: no step waits on the host. -> (indices per step, noise)"""
    g = torch.Generator().manual_seed(seed)
    batches = []
    noise = []
    like = torch.empty(0)   # the noise's dtype: float32, as dp_sgd_step draws it for the TinyLM
    for _ in range(recipe.steps):
        if recipe.dp_sigma > 0:
            batches.append(dp.poisson_sample(n, recipe.dp_sample_rate, g))
            noise.append(dp.gaussian_noise((n_noise,), 1.0, like, g))   # as dp_sgd_step draws it
        else:
            batches.append(torch.randint(n, (recipe.batch,), generator=g))
    indices = torch.cat(batches).to(device).split([len(b) for b in batches])
    return indices, torch.stack(noise).to(device) if noise else None


def stack_runs(datasets, others, what, device):
    """K datasets (x, y, mask) (N_k, T_k) -> x, y, mask (K, N, T), zero-padded to the largest N, T
    (mask 0: never a target, never a gradient). Refuses K = 0, N_k = 0 and len(others) != K."""
    if not len(datasets) or len(others) != len(datasets) or not all(len(d[0]) for d in datasets):
        raise ValueError(f"expected K > 0 datasets of N > 0 examples, one of the {what} each; got "
                         f"{[len(d[0]) for d in datasets]} examples and {len(others)} {what}")
    N = max(len(d[0]) for d in datasets)
    T = max(d[0].shape[1] for d in datasets)
    return [torch.stack([F.pad(d[i], (0, T - d[i].shape[1], 0, N - len(d[i]))) for d in datasets])
            .to(device) for i in range(3)]


def split_runs(n_runs, val_frac, seed, n_folds=1):
    """Shadow run indices (train, validation) for the translator, split by RUN, never by snapshot
    (snapshots of one run are near copies of each other and would leak across the split); with
    n_folds > 1, a list of n_folds such splits in which every run is held out once, the first of
    them the translator's (cross-validation for the linear map)."""
    order = stream(seed, "run split").permutation(n_runs)
    n_val = max(2, int(round(val_frac * n_runs)))
    held_out = [order[:n_val]] + (list(np.array_split(order[n_val:], n_folds - 1))
                                  if n_folds > 1 else [])
    folds = [(sorted(set(range(n_runs)) - set(v.tolist())), sorted(v.tolist()))
             for v in held_out if len(v)]
    return folds[0] if n_folds == 1 else folds


def shadow_examples(cfg, task, k, draw=None):
    """Shadow subset k's examples (draw r: DP draw r's own records, same mixture)."""
    subset = task.shadow_subset(k, cfg.n_train, cfg.shadow_alpha, cfg.shadow_near_mean, draw)
    return subset.examples


def held_out_examples(cfg, task, k, n):
    """n fresh records of shadow subset k's mixture, which none of its fine-tunes saw (the draw
    after the last DP draw's): what the provider's choice scores a held-out run's uploads on."""
    return task.shadow_subset(k, n, cfg.shadow_alpha, cfg.shadow_near_mean,
                              cfg.shadow_dp_draws).examples


def null_examples(cfg, task, i):
    """Noise-only upload i's records: n_train public lines that follow the task mixture m, what a
    client whose data holds no convention of its own has (the answer test's null)."""
    return task.public_examples(cfg.n_train, stream(cfg.seed, "null records", i))


def translator_inputs(cfg, shadow, runs, m, private):
    """The shadow pairs a map for level-m inputs learns from: X (runs, P, n_src, d_src), Y (runs, P,
    ...).

    Without DP (private False): the S clean snapshots of each run. With DP the inputs must carry
    the noise of the uploads they stand for: means of m DP draws of one subset (the mean of m
    uploads is ~sqrt(m) less noisy than one; shadow["X_private"], made by train.shadow_stages),
    P = R // m disjoint means per subset, each paired with the final LLM update."""
    if not private:
        return shadow["X"][runs], shadow["Y"][runs]
    P = cfg.shadow_dp_draws // m
    X = shadow["X_private"][runs, :P * m].unflatten(1, (P, m)).mean(2)
    return X, shadow["Y"][runs, -1:].expand(-1, P, -1, -1)


def dp_noise(cfg, shadow, runs, m):
    """Draws of the noise alone at the level of inputs that average m uploads: each DP draw of a
    subset minus the mean of that subset's R draws (the DP noise and, with fresh records per draw,
    which records a client holds), rescaled to the noise of one draw (x sqrt(R / (R - 1))) and then
    of a mean of m draws (/ sqrt(m)). (runs * R, n, d)."""
    draws = shadow["X_private"][runs]                                       # (runs, R, n, d)
    R = draws.shape[1]
    return ((draws - draws.mean(1, keepdim=True)) * math.sqrt(R / (R - 1) / m)).flatten(0, 1)


class Extra(NamedTuple):
    """Pairs the translator learns from besides the shadow pairs (with DP; its linear map keeps to
    the shadow pairs)."""
    X: torch.Tensor        # (N', n, d) noisy inputs, at the level of the shadow pairs' inputs
    Y: torch.Tensor        # (N', n_tgt, d_tgt) their LLM updates
    runs: np.ndarray       # (N', 2) the two runs each stands between (one run twice: a noise copy)


def between_runs(X_runs, Y_runs, noise, n_pairs, seed):
    """Pairs BETWEEN shadow runs, where mixed conventions sit (most shadow mixtures are near-pure,
    so a map learns the corners and guesses the middle): for runs a, b, a client holding both
    runs' data, its updates ~ the mean of theirs on both sides. The mean of two noisy inputs is
    sqrt(2) less noisy than one, so a draw of the noise alone (/ sqrt(2)) tops it back up. X_runs
    (runs, n, d) one input per run, Y_runs (runs, n_tgt, d_tgt), noise (N', n, d) draws at the
    inputs' level -> Extra, n_pairs distinct pairs at random."""
    rng = stream(seed, "between runs")
    pairs = np.array([(a, b) for a in range(len(X_runs)) for b in range(a + 1, len(X_runs))])
    pairs = pairs[np.sort(rng.permutation(len(pairs))[:n_pairs])]
    a = torch.from_numpy(pairs[:, 0])
    b = torch.from_numpy(pairs[:, 1])
    top_up = noise[torch.from_numpy(rng.choice(len(noise), len(pairs)))] / math.sqrt(2)
    return Extra((X_runs[a] + X_runs[b]) / 2 + top_up, (Y_runs[a] + Y_runs[b]) / 2, pairs)


def noise_copies(X_runs, Y_runs, noise, copies, seed):
    """`copies` more noisy inputs per run than its P DP inputs: their mean (the run's signal, with
    the noise / sqrt(P) a mean keeps) plus a draw of the noise alone x sqrt(1 - 1/P), one upload's
    noise in all. From a few draws a run the residual can learn the draws themselves; from fresh
    noise it must learn what survives it. X_runs (runs, P, n, d), Y_runs (runs, n_tgt, d_tgt),
    noise (N', n, d) -> Extra."""
    rng = stream(seed, "noise copies")
    draws = torch.from_numpy(rng.choice(len(noise), (len(X_runs), copies)))
    X = X_runs.mean(1, keepdim=True) + noise[draws] * math.sqrt(1 - 1 / X_runs.shape[1])
    runs = np.repeat(np.arange(len(X_runs)), copies)
    return Extra(X.flatten(0, 1), Y_runs[torch.from_numpy(runs)], np.stack([runs, runs], 1))


def extra_pairs(cfg, X_runs, Y_runs, noise):
    """With DP, the translator's pairs besides the shadow pairs X_runs (runs, P, n, d) -> Y_runs
    (runs, n_tgt, d_tgt): cfg.gt_mixup per shadow pair between runs, cfg.gt_noise_copies per run
    with fresh noise; noise (N', n, d) draws at the inputs' level (`dp_noise`)."""
    n_pairs = round(cfg.gt_mixup * X_runs.shape[0] * X_runs.shape[1])
    between = between_runs(X_runs[:, -1], Y_runs, noise, n_pairs, cfg.seed)
    copies = noise_copies(X_runs, Y_runs, noise, cfg.gt_noise_copies, cfg.seed)
    return Extra(torch.cat([between.X, copies.X]), torch.cat([between.Y, copies.Y]),
                 np.concatenate([between.runs, copies.runs]))


def make_task(name, seed):
    """The task object train.py and eval.py work with (the text task: experiments/text.py)."""
    if name != "arith":
        raise ValueError(f"unknown task {name!r}: expected 'arith' (the text task: "
                         "experiments/text.py)")
    return ArithTask(seed)
