"""
experiments/text.py -- the text task: language modeling on kinds of text a public model rarely sees,
scored in bits per byte. This file builds the corpus, splits it into who holds what (`TextTask`, the
same interface as data.ArithTask) and runs the whole protocol on it (train.run).

    python experiments/text.py                         # code, comments and the language reference
    python experiments/text.py --preset=text_smoke     # every stage at toy size, under a minute
    python experiments/text.py --text_path=my.txt      # your own UTF-8 text, in four sections
    python experiments/text.py --help                  # every option (config/presets.py: "text")

A file that cannot work (unreadable, not UTF-8, too short) ends the run with one line saying what is
wrong and exit code 2.
"""
import ast
import functools
import hashlib
import io
import os
import re
import sys
import sysconfig
import tokenize
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

import train
from config.presets import parse_args
from data import (NEAR_MEAN_ALPHA, Subset, digest, encode_lines, get_tokenizer,
                  is_near_mean, stream)


# -----------------------------------------------------------------------------
# the task: language modeling on kinds of text, scored in bits per byte
#
# Organizations differ in the KIND of text they hold (a hospital's notes, a law firm's contracts, a
# software company's code), and a public model's corpus under-represents each of them. A Corpus
# holds general prose (public pretraining text only) and documents of each kind; `stdlib_corpus`
# (below) builds one from the Python standard library (code, comments, the language reference),
# `file_corpus` from your file. Each kind is one client:
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
    name = "text"
    metric = "bits_per_byte"
    higher_is_better = False
    block_size = 64
    label_temperature = 1.0
    completion_len = block_size - block_size // 2 + 1      # prompt + completion = one whole window

    def __init__(self, seed, corpus, source="the corpus"):
        """corpus: a Corpus (experiments/text.py builds them); source names it in errors."""
        self.seed = seed
        self.enc = get_tokenizer()
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
        """n windows at random offsets of the pretraining text, on `device`: one step's
        `pretrain_draws`, its `pretrain_rows`."""
        return self.pretrain_rows(self.pretrain_draws(n, 1, rng, device)[0])

    def pretrain_draws(self, n, steps, rng, device="cpu"):
        """(steps, n) window offsets into the pretraining text (the general prose and every
        domain's PRETRAIN part), every step's drawn up front from rng in step order, then copied to
        `device` once; the text goes there too."""
        self._pretrain = self._pretrain.to(device)   # before any step runs
        top = len(self._pretrain) - self.block_size
        offsets = np.stack([rng.integers(0, top, size=n) for _ in range(steps)])
        return torch.from_numpy(offsets).to(device)

    def pretrain_rows(self, offsets):
        """The windows at offsets (B,) as x, y, mask (B, block_size), on the offsets' device: one
        gather."""
        device = offsets.device
        # (B, block_size + 1); the text is on the device already (`pretrain_draws`)
        tokens = self._pretrain[offsets[:, None] + torch.arange(self.block_size + 1, device=device)]
        return tokens[:, :-1], tokens[:, 1:], torch.ones(len(offsets), self.block_size,
                                                         device=device)

    def shadow_subset(self, k, n, alpha, near_mean=0.0, draw=None):
        """A Subset: a mixture over domains ~ Dirichlet(alpha * uniform) and n windows of the SHADOW
        pool drawn with it (a `near_mean` share of the subsets: Dirichlet(NEAR_MEAN_ALPHA *
        uniform)). draw r: the same mixture, fresh windows (DP draw r's)."""
        rng = stream(self.seed, "shadow subset", k)
        alpha = NEAR_MEAN_ALPHA if is_near_mean(k, near_mean) else alpha
        mixture = rng.dirichlet(np.full(len(self.domains), alpha / len(self.domains)))
        if draw is not None:
            rng = stream(self.seed, "shadow subset draw", k, draw)
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
        members = []
        span = self.block_size + 1
        for d, (domain, parts) in enumerate(self.splits.items()):
            rng = stream(self.seed, "client data", d)
            train, test = (windows(joined(parts[name]).encode(), span)
                           for name in ("train", "test"))
            test = pick(test, n_test, rng)
            mixture = np.eye(len(self.domains))[d].tolist()
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


def make_text_task(seed, text_path=""):
    """The text task for one seed: on the standard library's kinds of text, or on your file's
    sections. A ValueError says what is wrong with a file that cannot work."""
    if text_path:
        return TextTask(seed, file_corpus(text_path), f"--text_path={text_path}")
    return TextTask(seed, stdlib_corpus())


def main(argv):
    # the text preset by default; any preset's sizes (--preset=...) with the text task
    cfg = parse_args(["--preset=text"] + list(argv) + ["--task=text"], __doc__)
    try:
        task = make_text_task(cfg.seed, cfg.text_path)
    except ValueError as e:
        print(f"gradtx: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return train.run(cfg, task)


# -----------------------------------------------------------------------------
# the default corpus: kinds of text from the Python standard library
#
# Organizations differ in the KIND of text they hold (a hospital's notes, a law firm's contracts, a
# software company's code), and a public model's corpus under-represents each of them: it is mostly
# general prose. The default corpus plays that out with what ships with every CPython, read from
# the standard library's source files with ast and tokenize (never imported: importing runs code):
#
#   general prose  the docstrings of the modules in MODULES: all of it is public PRETRAIN text
#   client kinds   "code"      each function and method of CODE_MODULES, docstrings and comments
#                              taken out
#                  "comments"  each block of consecutive comment lines of MODULES
#                  "reference" each paragraph of the language reference (pydoc_data/topics.py, the
#                              text `help()` shows)
#
#   document of a kind --hash order--> PUBLIC: PRETRAIN (KIND_SHARES: 5%, so the kind is rare in
#                                              what the base models learn from) | SHADOW pool
#                                      PRIVATE: the kind's client's TRAIN | TEST
#   example: a window of at most block_size + 1 bytes of a kind's text (documents joined by blank
#            lines)
#
# With --text_path=FILE the kinds are the file's four sections (file_corpus), and the base models
# learn from each section's share of it (FILE_SHARES): the upload has something to carry when the
# sections differ.

MODULES = ("_collections_abc _pydecimal _strptime _threading_local abc argparse ast asyncio base64 "
           "bdb bisect bz2 calendar cmd code codecs codeop collections colorsys compileall "
           "concurrent configparser contextvars copy copyreg cProfile csv dataclasses datetime dbm "
           "difflib dis doctest email enum filecmp fileinput fnmatch fractions ftplib functools "
           "getopt gettext glob graphlib gzip hashlib heapq hmac html http imaplib importlib "
           "inspect ipaddress json locale lzma mimetypes modulefinder multiprocessing numbers "
           "operator optparse os pathlib pdb pickle pickletools pkgutil plistlib poplib pprint "
           "profile pstats py_compile pyclbr pydoc queue random re reprlib rlcompleter runpy "
           "sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 "
           "ssl statistics string stringprep subprocess symtable tabnanny tarfile tempfile "
           "textwrap threading timeit tokenize tomllib trace traceback tracemalloc types "
           "unittest urllib uuid weakref webbrowser wsgiref xml xmlrpc zipfile zipimport "
           "zoneinfo").split()
# the code kind: 34 of the modules, so that it holds about as much text as the comments
CODE_MODULES = ("_collections_abc _pydecimal abc base64 bisect bz2 collections configparser copy "
                "csv dataclasses dbm enum filecmp fileinput functools graphlib gzip hashlib heapq "
                "json lzma operator os pathlib pickle shelve shutil tarfile tempfile types uuid "
                "weakref zipfile").split()
MIN_DOC_CHARS = 40      # shorter documents are boilerplate
MIN_KIND_BYTES = 200_000   # less: a distribution left part of the standard library out
# of a kind's documents
KIND_SHARES = {"pretrain": 0.05, "shadow": 0.4, "train": 0.4, "test": 0.15}
FILE_SHARES = {"pretrain": 0.3, "shadow": 0.3, "train": 0.3, "test": 0.1}     # of a file's pieces
MIN_FILE_BYTES = 10_000
PIECE_BYTES = 512       # a user's file is cut into pieces of at most this many bytes




def module_files(root, name):
    """The source files of a top-level module or package, in sorted order, test folders left out."""
    if os.path.isfile(path := os.path.join(root, name + ".py")):
        return [path]
    files = []
    for folder, subfolders, names in os.walk(os.path.join(root, name)):
        subfolders[:] = sorted(d for d in subfolders if d not in ("test", "tests", "__pycache__"))
        files += [os.path.join(folder, f) for f in sorted(names) if f.endswith(".py")]
    return files


def docstring_nodes(node):
    """(owner, docstring expression) of a module and of every class and function in it, in source
    order."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        if ast.get_docstring(node) is not None:
            yield node, node.body[0]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt):   # classes and functions are statements, possibly nested
            yield from docstring_nodes(child)


def functions(tree):
    """Module-level functions, and the methods of module-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef)))


def comments(source):
    """{line number: column} of every comment of a Python source (bytes), read with tokenize."""
    found = {}
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.start[1]
    return found


def comment_blocks(lines, found):
    """Runs of consecutive lines that hold nothing but a comment, each as one text, unindented."""
    blocks = []
    run = []
    for number in sorted(found):
        line = lines[number - 1]
        if line[:found[number]].strip():          # a comment after code: not a comment line
            continue
        if run and number != run[-1][0] + 1:
            blocks.append(run)
            run = []
        run.append((number, line.strip()))
    return ["\n".join(text for _, text in run) for run in blocks + [run] if run]


def code_text(lines, node, docstring_lines, found):
    """A function's source lines, its docstrings' lines and every comment taken out."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept = []
    for number in range(first, node.end_lineno + 1):
        line = lines[number - 1]
        if number in docstring_lines:
            continue
        if number in found:
            line = line[:found[number]].rstrip()
        if line.strip():
            kept.append(line)
    return "\n".join(kept)


def keep(text):
    """ASCII and long enough: shorter texts ("Return self.", "# noqa") are boilerplate."""
    return len(text) >= MIN_DOC_CHARS and text.isascii()


@functools.cache   # once per process: reading ~300 files takes a few seconds
def stdlib_corpus():
    """The default corpus (see above), from the running Python's standard library: each document
    once, ASCII, MIN_DOC_CHARS or more. A kind under MIN_KIND_BYTES (a distribution that leaves out
    part of the library) stops here with what is missing."""
    root = sysconfig.get_paths()["stdlib"]
    seen = set()
    general = []
    kinds = {"code": [], "comments": [], "reference": []}

    def add(documents, text):
        if keep(text) and text not in seen:
            seen.add(text)
            documents.append(text)

    for name, path in ((name, p) for name in sorted(MODULES) for p in module_files(root, name)):
        with open(path, "rb") as f:
            source = f.read()
        tree = ast.parse(source)
        lines = source.decode("utf-8").splitlines()
        docstring_lines = set()
        for owner, node in docstring_nodes(tree):
            add(general, ast.get_docstring(owner))
            docstring_lines.update(range(node.lineno, node.end_lineno + 1))
        found = comments(source)
        for block in comment_blocks(lines, found):
            add(kinds["comments"], block)
        if name in CODE_MODULES:
            for node in functions(tree):
                add(kinds["code"], code_text(lines, node, docstring_lines, found))
    for topic in reference_topics(root).values():
        for paragraph in re.split(r"\n[ \t]*\n", topic):
            add(kinds["reference"], paragraph.strip("\n"))
    for kind, documents in kinds.items():
        size = sum(map(len, documents))
        if size < MIN_KIND_BYTES:
            raise ValueError(f"the default text corpus: only {size:,} bytes of {kind!r} text in "
                             f"{root}: expected at least {MIN_KIND_BYTES:,} (a full standard "
                             "library; or give your own file with --text_path)")
    return Corpus(general, kinds, KIND_SHARES)


def reference_topics(root):
    """{topic: text} of the language reference that pydoc shows, read from pydoc_data/topics.py
    with ast (a dict literal), never imported."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        raise ValueError(f"the default text corpus needs {path}, which this Python's distribution "
                         "leaves out: expected a full standard library (or give your own file "
                         "with --text_path)")
    with open(path, "rb") as f:
        assignment = ast.parse(f.read()).body[-1]
    return ast.literal_eval(assignment.value)


def read_text_file(path):
    """The file's text, or a ValueError naming what is wrong with it."""
    where = f"--text_path={path}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw.decode("utf-8").replace("\r\n", "\n")
    except OSError as e:
        raise ValueError(f"{where}: cannot read it ({e.strerror}): "
                         "expected a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset "
                         f"{e.start}): expected a UTF-8 text file") from None


def pieces(text, size=PIECE_BYTES, separators=("\n\n", "\n", " ")):
    """`text` cut into pieces of at most `size` UTF-8 bytes: at blank lines where it can, else at
    line breaks, else at spaces, else between characters; neighbouring short parts packed together
    up to `size`. Any file, however its paragraphs run (one huge one, many tiny ones, no blank lines
    at all), gives pieces of a few hundred bytes."""
    text = text.strip()
    if len(text.encode()) <= size:
        return [text] if text else []
    if not separators:        # one long word: by characters (4 UTF-8 bytes at most each)
        return [text[i:i + size // 4] for i in range(0, len(text), size // 4)]
    sep = separators[0]
    finer = separators[1:]
    packed = []
    for unit in (u for part in text.split(sep) for u in pieces(part, size, finer)):
        if packed and len((packed[-1] + sep + unit).encode()) <= size:
            packed[-1] += sep + unit
        else:
            packed.append(unit)
    return packed


def file_corpus(path, n_sections=4):
    """A UTF-8 file as a corpus: its pieces (see `pieces`) in n_sections contiguous sections of
    about equal size (each piece goes to the section where it starts), one client each."""
    chunks = pieces(read_text_file(path))
    sizes = np.array([len(c.encode()) + 2 for c in chunks], dtype=np.int64)   # + the blank line
    if sizes.sum() < MIN_FILE_BYTES:
        raise ValueError(f"--text_path={path}: {max(0, sizes.sum() - 2 * len(chunks)):,} bytes of "
                         f"text: expected at least {MIN_FILE_BYTES:,} (fine-tuning gains need "
                         "~20 KB of private text per section)")
    section = (np.cumsum(sizes) - sizes) * n_sections // sizes.sum()
    kinds = {f"part{i + 1}": [c for c, s in zip(chunks, section) if s == i]
             for i in range(n_sections)}
    return Corpus([], kinds, FILE_SHARES)


if __name__ == "__main__":
    main(sys.argv[1:])
