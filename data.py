"""
data.py -- the tokenizer, the two tasks (`arith` and `text`), and who holds which data.
No downloads, no data files: arith is generated from a seed; the text task splits a corpus of kinds
of text that experiments/text.py reads from the Python installation (or from your file).

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

The `text` task (TextTask) is language modeling on kinds of text -- code, comments, the language
reference -- rare in the base models' general prose (or on the sections of your file): the same
roles, with a kind of text instead of a convention.

    python -c "import data; print(data.make_task('arith', 0).clients(3, 2)[0])"  # a client
    python -m pytest -q tests/test_data.py tests/test_text.py
"""
import hashlib
import re
from typing import NamedTuple

import numpy as np
import tiktoken
import torch

# -----------------------------------------------------------------------------
# random streams: each kind of draw has a stream of its own, so changing one stage never moves
# another's draws. numpy draws come from [seed, stream, *index]; a fine-tuning run takes one
# integer torch seed: a large prime times the seed, plus its weighted indices.

STREAMS = {"pretrain batches": 0, "shadow subset": 1, "client data": 2, "run split": 3,
           "public examples": 4, "random clients": 5, "audit canaries": 7, "audit prompts": 8}
RUN_SEEDS = {"shadow run": (1_000_003, 1), "client run": (2_000_003, 1),
             "shadow DP draw": (3_000_017, 1_009, 1), "audit client": (5_000_011, 1),
             "audit setting": (6_000_007, 1)}


def stream(seed, name, *index):
    """The numpy Generator of one stream, e.g. stream(seed, "shadow subset", k)."""
    return np.random.default_rng([seed, STREAMS[name], *index])


def run_seed(seed, name, *index):
    """The torch seed of one run, e.g. run_seed(seed, "shadow DP draw", k, r) = 3_000_017 * seed
    + 1_009 * k + r."""
    scale, *weights = RUN_SEEDS[name]
    return scale * seed + sum(w * i for w, i in zip(weights, index))

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

OPS = ["+", "-", ">", "<"]                     # add, |a-b|, max, min
OP_FUNCS = [lambda a, b: a + b, lambda a, b: abs(a - b), max, min]
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
    train, test = lines[:n_distinct], lines[n_distinct:]
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
    """The arith task for one seed, with all that train.py and eval.py ask of a task (TextTask has
    the same interface). A model is scored on a line by generating `completion_len` tokens after
    `prompt(line)`."""
    name, metric, higher_is_better = "arith", "accuracy", True
    block_size, completion_len, label_temperature = BLOCK_SIZE, ANSWER_LEN, 0.0

    def __init__(self, seed):
        self.seed, self.enc = seed, get_tokenizer()
        self.public, self.private = split_pairs(seed)
        self.explicit, self.ambiguous = pretrain_corpus()
        # {device: the encoded corpus}, made on first use
        self._corpus = {}

    def fingerprint(self):   # of the pretraining corpus: pretraining's cache key
        return digest(self.explicit + self.ambiguous)

    def encode(self, examples):
        return encode_lines(examples, self.enc)

    def pretrain_batch(self, n, rng, device="cpu"):
        """n pretraining lines, on `device`: the corpus goes there once, then only the indices
        travel."""
        if str(device) not in self._corpus:   # 3 x (2 * n_problems, T)
            self._corpus[str(device)] = tuple(t.to(device)
                                              for t in self.encode(self.explicit + self.ambiguous))
        idx = torch.from_numpy(pretrain_indices(n, rng, len(self.explicit)))
        idx = idx.to(device, non_blocking=True)
        return tuple(t[idx] for t in self._corpus[str(device)])

    def shadow_subset(self, k, n, alpha, near_mean=0.0):
        """A Subset of public pairs, operators from a mixture ~ Dirichlet(alpha * m): around m,
        spread to reach any client's (mostly near-pure for alpha < 1); a `near_mean` share of the
        subsets ~ Dirichlet(NEAR_MEAN_ALPHA * m) instead, close to m, where IID clients sit."""
        rng = stream(self.seed, "shadow subset", k)
        mixture = rng.dirichlet((NEAR_MEAN_ALPHA if is_near_mean(k, near_mean) else alpha)
                                * TASK_MIXTURE)
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
        return example[:PROMPT_LEN]

    def is_correct(self, example, completion):
        return parse_answer(completion) == parse_answer(example)

    def relabelled(self, prompt, completion):
        """The prompt answered by a model's completion, or None when it does not start with an
        answer."""
        answer = re.match(ANSWER, completion)
        return prompt + answer.group(0) + "\n" if answer else None


# -----------------------------------------------------------------------------
# the text task: language modeling on kinds of text, scored in bits per byte
#
# Organizations differ in the KIND of text they hold (a hospital's notes, a law firm's contracts, a
# software company's code), and a public model's corpus under-represents each of them. A Corpus
# holds general prose (public pretraining text only) and documents of each kind; experiments/text.py
# builds one from the Python standard library (code, comments, the language reference) or from
# your file. Each kind is one client:
#
#   document of a kind --hash order--> PUBLIC: PRETRAIN (a small share: the kind stays rare in what
#                                              the base models learn from) | SHADOW pool
#                                      PRIVATE: the kind's client's TRAIN | TEST
#   example: a window of at most block_size + 1 bytes of a kind's text (documents joined by blank
#            lines)


class Corpus(NamedTuple):
    general: list      # documents that are only ever public pretraining text
    kinds: dict        # {kind: [documents]}: one client each, split by `shares`
    shares: dict       # {"pretrain", "shadow", "train", "test"}: the share of each kind's documents


def split_documents(kinds, seed, shares):
    """{kind: {"pretrain": [...], "shadow": [...], "train": [...], "test": [...]}}: each kind's
    documents in the order of a hash of (seed, document), cut into consecutive runs in proportion
    to `shares` (at least one document each): disjoint by construction, and the seed decides."""
    splits = {}
    for kind, docs in kinds.items():
        order = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).digest())
        counts = quotas(len(order), list(shares.values()))
        ends = np.cumsum(counts)
        splits[kind] = {name: order[end - n:end] for name, n, end in zip(shares, counts, ends)}
    return splits


def quotas(n, shares):
    """n split in proportion to shares, in whole numbers that add up to n (largest remainders
    first), each at least 1 when n allows."""
    exact = np.array(shares) * n / sum(shares)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(counts - exact, kind="stable")[:n - counts.sum()]:
        counts[i] += 1
    while n >= len(shares) and (counts == 0).any():    # take one from the largest part
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts.tolist()


def joined(documents):
    """Documents as one text, each followed by a blank line (as paragraphs in a file)."""
    return "".join(d + "\n\n" for d in documents)


def windows(raw, size, n=None, rng=None):
    """Windows of at most `size` of the UTF-8 bytes `raw`, as text (a character cut at an edge is
    left out): n at random offsets, or (n=None) one every size - 1 bytes: every byte but the first
    predicted once."""
    starts = (range(0, len(raw) - 1, size - 1) if n is None
              else rng.integers(0, len(raw) - size + 1, size=n))
    return [raw[i:i + size].decode("utf-8", "ignore") for i in starts]


def pick(items, n, rng):
    """At most n of the items, in their order (all of them when there are no more than n)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.sort(rng.choice(len(items), n, replace=False))]


class TextTask:
    """Language modeling for one seed, scored in bits per byte (one token is one byte): no
    `is_correct`. Its domains are the corpus's kinds of text (or your file's sections), one client
    each."""
    name, metric, higher_is_better = "text", "bits_per_byte", False
    block_size, label_temperature = 64, 1.0
    completion_len = block_size - block_size // 2 + 1      # prompt + completion = one whole window

    def __init__(self, seed, corpus, source="the corpus"):
        """corpus: a Corpus (experiments/text.py builds them); source names it in errors."""
        self.seed, self.enc = seed, get_tokenizer()
        self.splits = split_documents(corpus.kinds, seed, corpus.shares)
        self.domains = list(self.splits)
        for domain, parts in self.splits.items():
            sizes = {name: len(joined(docs).encode()) for name, docs in parts.items()}
            if min(sizes.values()) < 2 * (self.block_size + 1):
                raise ValueError(f"{source}: "
                                 f"{domain!r} has {' / '.join(map(str, sizes.values()))} "
                                 f"bytes of {' / '.join(sizes)} text: expected at least "
                                 f"{2 * (self.block_size + 1)} in each (a longer file)")
        self.shadow_raw = {d: joined(parts["shadow"]).encode() for d, parts in self.splits.items()}
        # what the base models learn from: the general prose, and each kind's small public share
        self.pretrain_documents = corpus.general + [d for parts in self.splits.values()
                                                    for d in parts["pretrain"]]
        pretrain = joined(self.pretrain_documents).encode()
        self._pretrain = torch.frombuffer(bytearray(pretrain), dtype=torch.uint8).long()

    # of exactly the text the base models are pretrained on: pretraining's cache key
    def fingerprint(self):
        return digest(self.pretrain_documents)

    # x, y, mask (N, block_size): every byte but a window's first is predicted
    def encode(self, examples):
        return encode_lines(examples, self.enc, self.block_size, first_target=0, pad=True)

    def pretrain_batch(self, n, rng, device="cpu"):
        """n windows at random offsets of the pretraining text (the general prose and every
        domain's PRETRAIN part), on `device`: the text goes there once, then only the offsets
        travel."""
        self._pretrain = self._pretrain.to(device)   # moved on the first call, a no-op after that
        offsets = torch.from_numpy(rng.integers(0, len(self._pretrain) - self.block_size, size=n))
        window = (offsets.to(device, non_blocking=True)[:, None]
                  + torch.arange(self.block_size + 1, device=device))
        # (n, block_size + 1)
        tokens = self._pretrain[window]
        return tokens[:, :-1], tokens[:, 1:], torch.ones(n, self.block_size, device=device)

    def shadow_subset(self, k, n, alpha, near_mean=0.0):
        """A Subset: a mixture over domains ~ Dirichlet(alpha * uniform) and n windows of the SHADOW
        pool drawn with it (a `near_mean` share of the subsets: Dirichlet(NEAR_MEAN_ALPHA *
        uniform))."""
        rng = stream(self.seed, "shadow subset", k)
        alpha = NEAR_MEAN_ALPHA if is_near_mean(k, near_mean) else alpha
        mixture = rng.dirichlet(np.full(len(self.domains), alpha / len(self.domains)))
        counts = np.bincount(rng.choice(len(self.domains), size=n, p=mixture),
                             minlength=len(self.domains))
        examples = [w for d, c in zip(self.domains, counts)
                    for w in windows(self.shadow_raw[d], self.block_size + 1, c, rng)]
        # shuffled: any first few (the selection criterion scores the first val_examples) follow the
        # mixture too, not the first domain
        return Subset(mixture, [examples[i] for i in rng.permutation(n)])

    def public_examples(self, n, rng):
        """n windows of the SHADOW pool at random offsets (n=None: all of it in consecutive
        windows)."""
        return windows(b"".join(self.shadow_raw.values()), self.block_size + 1, n, rng)

    def clients(self, n_train, n_test, group_size=1, skew=None, n_random=0):
        """One client (or group of group_size members, splitting its TRAIN windows) per domain: at
        most n_train / n_test TRAIN / TEST windows, drawn at random when the domain has more. `skew`
        means nothing here."""
        members, span = [], self.block_size + 1
        for d, (domain, parts) in enumerate(self.splits.items()):
            rng = stream(self.seed, "client data", d)
            train, test = (windows(joined(parts[name]).encode(), span)
                           for name in ("train", "test"))
            test, mixture = pick(test, n_test, rng), np.eye(len(self.domains))[d].tolist()
            for j, part in enumerate(np.array_split(np.arange(len(train)), group_size)):
                members.append({"name": domain if group_size == 1 else f"{domain}/{j}",
                                "group": domain, "kind": "domain", "index": len(members),
                                "mixture": mixture,
                                "train": pick([train[i] for i in part], n_train, rng),
                                "test": test})
        return members

    # eval.py's w2s and kd labels: this + the TinyLM's continuation at temperature 1
    def prompt(self, example):
        return example[:self.block_size // 2]

    def relabelled(self, prompt, completion):
        """The prompt followed by a model's continuation, cut to one window (block_size + 1
        bytes)."""
        return (prompt + completion).encode()[:self.block_size + 1].decode("utf-8", "ignore")


def make_task(name, seed):
    """The task object train.py and eval.py work with. The text task needs a corpus:
    experiments/text.py builds it, then data.TextTask(seed, corpus)."""
    if name != "arith":
        raise ValueError(f"unknown task {name!r}: expected 'arith' (the text task: TextTask)")
    return ArithTask(seed)
