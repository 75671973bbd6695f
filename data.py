"""
data.py -- the tokenizer, the `arith` task, and who holds which data.

Everything is generated from a seed by the code below: no downloads, no data files.

The task (SPEC §3.2) is an *operator convention* task. Lines look like

    37+52=+89     explicit operators: + add, - |a-b|, > max, < min
    37@52=>52     '@' is ambiguous: it stands for one of the four operators

After the answer marker '=' the model first names the operator it applies, then the result: a
one-step "reasoning then answer", scored on the number. Every line has the same layout, so each
character sits at the same position whatever the operator (absolute position embeddings).

Pretraining (public) teaches arithmetic with explicit operators and shows '@' lines whose meaning
is drawn uniformly at random, so the base models learn that '@' means "one of the operators".
Each organization writes '@' with its own *convention*: a mixture over the four operators. The
task is to answer its '@' problems; fine-tuning on its data teaches its convention, and the
larger model, which computes better, gains more from it.

Who holds what:
    operand pairs (a, b) --hash--> PUBLIC pool (the provider's shadow data) | PRIVATE pool (clients)
    shadow subset k: public pairs, operators from its own mixture ~ Dirichlet(alpha * m)
    client: private pairs, operators from its mixture (IID: the task mixture m; skewed: ~88% one
            operator), with its own disjoint test split drawn from the same mixture

    python -m pytest tests/test_data.py
"""
import hashlib
import re

import numpy as np
import tiktoken
import torch

# -----------------------------------------------------------------------------
# tokenizer: a tiktoken Encoding built from our own ranks (no network, tiny vocabulary)

EOT = "<|endoftext|>"


def get_tokenizer(name="bytes"):
    """Byte-level by default: the 256 single bytes (all of them, or tiktoken panics) + EOT.

    A named tiktoken encoding (e.g. "gpt2") works too for users with network access, but its 50k
    vocabulary would dominate a tiny model, so it is never the default.
    """
    if name != "bytes":
        return tiktoken.get_encoding(name)  # downloads its files: needs the network
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="gradtx-bytes", pat_str=r"[^\n]+|\n",
                             mergeable_ranks=ranks, special_tokens={EOT: 256})


# -----------------------------------------------------------------------------
# the arith task

OPS = ["+", "-", ">", "<"]                     # add, |a-b|, max, min
OP_FUNCS = [lambda a, b: a + b, lambda a, b: abs(a - b), max, min]
AMBIGUOUS = "@"
TASK_MIXTURE = np.array([0.5, 0.2, 0.15, 0.15])  # the task's overall convention m (NOT uniform:
                                                 # an IID client must have something to learn)
PROMPT_LEN = 5                                   # "37@52": operands always 2 digits
ANSWER_LEN = 6                                   # "=+198\n" at most
BLOCK_SIZE = 16


def make_line(a, b, op, symbol=None):
    """One problem as text: '37@52=>52\\n' (symbol defaults to the ambiguous '@')."""
    return f"{a}{symbol or AMBIGUOUS}{b}={OPS[op]}{OP_FUNCS[op](a, b)}\n"


def all_pairs():
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def split_pairs(seed):
    """PUBLIC / PRIVATE operand pairs, disjoint by construction: a hash of (seed, a, b) decides."""
    public, private = [], []
    for a, b in all_pairs():
        h = hashlib.sha256(f"{seed}:{a}:{b}".encode()).digest()[0]
        (public if h % 2 == 0 else private).append((a, b))
    return public, private


def lines_from(pairs, mixture, n, rng):
    """n '@' lines on distinct operand pairs, operators drawn from `mixture`."""
    idx = rng.choice(len(pairs), size=n, replace=n > len(pairs))
    ops = rng.choice(len(OPS), size=n, p=mixture)
    return [make_line(*pairs[i], op) for i, op in zip(idx, ops)]


def pretrain_corpus():
    """The public pretraining corpus: every problem once with its explicit operator, once with '@'.

    It covers all operand pairs: it plays the role of the web text that taught a public
    checkpoint arithmetic, and it carries no organization's convention ('@' lines use each
    operator equally often). Returns (explicit_lines, ambiguous_lines), aligned.
    """
    problems = [(a, b, op) for a, b in all_pairs() for op in range(len(OPS))]
    return ([make_line(a, b, op, OPS[op]) for a, b, op in problems],
            [make_line(a, b, op) for a, b, op in problems])


def pretrain_indices(n, rng, n_problems, explicit_frac=0.6):
    """n random line indices into explicit_lines + ambiguous_lines: explicit with prob explicit_frac."""
    idx = rng.integers(n_problems, size=n)
    return np.where(rng.random(n) < explicit_frac, idx, n_problems + idx)


def pretrain_lines(n, rng, explicit_frac=0.6):
    """n lines drawn from the pretraining corpus (a convenience for small experiments)."""
    explicit, ambiguous = pretrain_corpus()
    corpus = explicit + ambiguous
    return [corpus[i] for i in pretrain_indices(n, rng, len(explicit), explicit_frac)]


def parse_answer(text):
    """The integer after the answer marker '=' (and the operator it names, if any), or None.

    A model that never writes '=' (or writes no digits after it) gets None, i.e. scores 0.
    """
    if "=" not in text:
        return None
    digits, answer = "", text.split("=", 1)[1]
    if answer[:1] in OPS:
        answer = answer[1:]
    for ch in answer:
        if ch not in "0123456789":  # not str.isdigit(): it accepts '²', which int() refuses
            break
        digits += ch
    return int(digits) if digits else None


# -----------------------------------------------------------------------------
# batches: (x, y, mask) with the loss on the answer only


def encode_lines(lines, enc, block_size=BLOCK_SIZE):
    """Lines -> x, y (N, T) next-token pairs and mask (N, T), 1 on '=', the answer and '\\n'
    (the loss is on the answer only: the question is given, never predicted).

    Shorter lines are padded with EOT, with mask 0 there.
    """
    rows = [enc.encode_ordinary(line) for line in lines]
    lengths = np.array([len(r) for r in rows])
    T = lengths.max() - 1
    if T > block_size:
        raise ValueError(f"a line has {T + 1} tokens, more than block_size + 1 = {block_size + 1}")
    tokens = np.full((len(rows), T + 1), enc.eot_token, dtype=np.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    pos = np.arange(T)[None, :]                       # y[:, PROMPT_LEN - 1] is the '='
    mask = (pos >= PROMPT_LEN - 1) & (pos < lengths[:, None] - 1)
    tokens = torch.from_numpy(tokens)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), torch.from_numpy(mask).float()


def encode_prompts(lines, enc):
    """The question part of each line, '37@52', as a (N, PROMPT_LEN) tensor, and the answers."""
    prompts = torch.tensor([enc.encode(line[:PROMPT_LEN]) for line in lines], dtype=torch.long)
    answers = [parse_answer(line) for line in lines]
    return prompts, answers


# -----------------------------------------------------------------------------
# who holds what: shadow subsets and clients


def shadow_subsets(public_pairs, k, n, alpha, seed):
    """K shadow datasets from the public pool, each with its own operator mixture.

    Mixtures ~ Dirichlet(alpha * m): centred on the task mixture m, spread wide enough that the
    shadow updates cover the conventions clients may have. Returns [(mixture, lines)].
    """
    return [shadow_subset(public_pairs, n, alpha, seed, i) for i in range(k)]


def shadow_subset(public_pairs, n, alpha, seed, i):
    """Shadow subset number i alone: (mixture, lines)."""
    rng = np.random.default_rng([seed, 1, i])
    mixture = rng.dirichlet(alpha * TASK_MIXTURE)
    return mixture, lines_from(public_pairs, mixture, n, rng)


def client_mixtures(n_skewed_per_op=1, n_iid=1, skew=0.88):
    """Default clients: one SKEWED client per operator (~88% of it) and IID clients (mixture m)."""
    clients = []
    for op in range(len(OPS)):
        for j in range(n_skewed_per_op):
            mix = np.full(len(OPS), (1 - skew) / (len(OPS) - 1))
            mix[op] = skew
            clients.append((f"skewed_{OPS[op]}" + (f"_{j}" if n_skewed_per_op > 1 else ""), "skewed", mix))
    for j in range(n_iid):
        clients.append((f"iid_{j}", "iid", TASK_MIXTURE.copy()))
    return clients


def client_data(private_pairs, mixture, n_train, n_test, seed, index):
    """A client's private train lines and its own test lines, on disjoint operand pairs."""
    if n_train + n_test > len(private_pairs):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the private pool "
                         f"({len(private_pairs)} operand pairs)")
    rng = np.random.default_rng([seed, 2, index])
    order = rng.permutation(len(private_pairs))
    ops = rng.choice(len(OPS), size=n_train + n_test, p=mixture)
    lines = [make_line(*private_pairs[i], op) for i, op in zip(order, ops)]
    return lines[:n_train], lines[n_train:]


# -----------------------------------------------------------------------------
# the task object: what train.py and eval.py ask of a task (TextTask has the same methods)


def digest(strings):
    """A short fingerprint of generated data: stage caches are keyed by it, so they cannot go stale."""
    h = hashlib.sha1()
    for s in strings:
        h.update(s.encode() + b"\x00")
    return h.hexdigest()[:12]


class ArithTask:
    """The arith task for one seed. Examples are lines of text; a model is scored on an example by
    generating `completion_len` tokens after `prompt(example)` (accuracy of the parsed answer)."""
    name, metric, higher_is_better = "arith", "accuracy", True
    block_size, completion_len, label_temperature = BLOCK_SIZE, ANSWER_LEN, 0.0

    def __init__(self, seed):
        self.seed, self.enc = seed, get_tokenizer()
        self.public, self.private = split_pairs(seed)
        self.explicit, self.ambiguous = pretrain_corpus()
        self._corpus = None                               # encoded once, on first use

    def fingerprint(self):
        """Of the pretraining corpus (pretraining's cache key)."""
        return digest(self.explicit + self.ambiguous)

    def encode(self, examples):
        return encode_lines(examples, self.enc)

    def pretrain_batch(self, n, rng):
        if self._corpus is None:
            self._corpus = self.encode(self.explicit + self.ambiguous)       # 3 x (2 * n_problems, T)
        idx = torch.from_numpy(pretrain_indices(n, rng, len(self.explicit)))
        return tuple(t[idx] for t in self._corpus)

    def shadow_subset(self, k, n, alpha):
        """(mixture, lines) of shadow subset k (public pairs only)."""
        return shadow_subset(self.public, n, alpha, self.seed, k)

    def public_examples(self, n, rng):
        """n public lines that follow the task's overall mixture (n=None: one per public pair)."""
        return lines_from(self.public, TASK_MIXTURE, n or len(self.public), rng)

    def clients(self, n_train, n_test, group_size=1, skew=0.88):
        """Convention groups (one per skewed operator, and the IID mixture) of group_size members,
        each with its own private train and test lines. Member i's data depends on (seed, i) only."""
        members = []
        for group, kind, mixture in client_mixtures(1, 1, skew):
            for j in range(group_size):
                train, test = client_data(self.private, mixture, n_train, n_test, self.seed, len(members))
                members.append({"name": group if group_size == 1 else f"{group}/{j}", "group": group,
                                "kind": kind, "index": len(members), "mixture": mixture.tolist(),
                                "train": train, "test": test})
        return members

    # scoring and relabelling by generation (eval.py)
    def prompt(self, example):
        return example[:PROMPT_LEN]

    def is_correct(self, example, completion):
        return parse_answer(completion) == parse_answer(example)

    def relabelled(self, prompt, completion):
        """The prompt answered by a model's completion ('=', an operator, digits), or None when the
        completion does not start with an answer in the task's format."""
        answer = re.match(r"=[-+<>]?[0-9]+", completion)
        return prompt + answer.group(0) + "\n" if answer else None


def make_task(name, seed, text_path=""):
    if name == "arith":
        return ArithTask(seed)
    raise ValueError(f"unknown task {name!r}: expected 'arith'")
