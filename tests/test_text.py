"""Tests for the text task (text_experiment.TextTask): the corpus and its split, windows, bits per byte on a
hand-made case, bad --text_path files, and the protocol end to end on text at toy size.

Oracles: Python's own UTF-8 bytes and substring search for the windows, set algebra for the splits,
log2(257) for a model that knows nothing, a loop over positions for bits per byte.

Run:  python -m pytest tests/test_text.py -q
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

import data
import eval as evaluation
import tinylm
import train
from experiments import text as text_experiment


@pytest.fixture(scope="module")
def task():
    return text_experiment.make_text_task(0)


def user_text(n_paragraphs=400):
    """A made-up UTF-8 document of ~35 KB: numbered paragraphs, some with non-ASCII characters."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu café naïve".split()
    rng = np.random.default_rng(0)
    return "\n\n".join(f"Paragraph {i}. " + " ".join(rng.choice(words, size=12)) for i in range(n_paragraphs)) + "\n"


# -----------------------------------------------------------------------------
# the corpus and who holds which document


def test_corpus_is_deterministic_ascii_and_big_enough(task):
    corpus = text_experiment.stdlib_corpus()
    assert list(corpus.kinds) == ["code", "comments", "reference"] and corpus.shares == text_experiment.KIND_SHARES
    assert text_experiment.stdlib_corpus.__wrapped__() == corpus                # built again from scratch: the same
    docs = corpus.general + [d for ds in corpus.kinds.values() for d in ds]
    assert len(docs) == len(set(docs)) > 10_000                      # each text once
    assert all(d.isascii() and len(d) >= text_experiment.MIN_DOC_CHARS for d in docs)
    assert 0.8e6 < sum(map(len, corpus.general)) < 1.5e6             # ~1 MB of docstrings
    for kind, documents in corpus.kinds.items():                     # ~0.3-0.7 MB each
        assert sum(map(len, documents)) >= text_experiment.MIN_KIND_BYTES, kind
        assert len(text_experiment.joined(task.splits[kind]["train"])) > 60_000, kind


def test_each_kind_is_what_it_says(task):
    corpus = text_experiment.stdlib_corpus()
    for block in corpus.kinds["comments"]:                           # comment lines and nothing else
        assert all(line.startswith("#") for line in block.splitlines()), block
    long_docstrings = [d for d in corpus.general if len(d) > 300][:50]
    for code in corpus.kinds["code"]:                                # code without comments or docstrings
        assert not any(line.lstrip().startswith("#") for line in code.splitlines()), code
        assert code.lstrip().startswith(("def ", "async def ", "@")), code
    code = "\n".join(corpus.kinds["code"])
    assert not any(d in code for d in long_docstrings)
    root = text_experiment.sysconfig.get_paths()["stdlib"]
    topics = "\n".join(text_experiment.reference_topics(root).values())
    assert all(p in topics for p in corpus.kinds["reference"][::25])   # the language reference's text


def test_a_python_without_part_of_its_library_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(text_experiment.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(ValueError, match="pydoc_data.topics.py, which this Python's distribution leaves out"):
        text_experiment.stdlib_corpus.__wrapped__()
    (tmp_path / "pydoc_data").mkdir()
    (tmp_path / "pydoc_data" / "topics.py").write_text("topics = {'x': 'A paragraph of the reference.'}\n")
    with pytest.raises(ValueError, match="only 0 bytes of 'code' text"):
        text_experiment.stdlib_corpus.__wrapped__()


def test_split_is_disjoint_complete_and_seeded(task):
    kinds = text_experiment.stdlib_corpus().kinds
    for kind, docs in kinds.items():
        parts = [task.splits[kind][name] for name in text_experiment.KIND_SHARES]
        assert sorted(sum(parts, [])) == sorted(docs)                              # each document once
        assert [len(p) for p in parts] == text_experiment.quotas(len(docs), list(text_experiment.KIND_SHARES.values()))
    other = text_experiment.split_documents(kinds, 1, text_experiment.KIND_SHARES)
    assert set(other["code"]["shadow"]) != set(task.splits["code"]["shadow"])    # the seed decides
    assert text_experiment.split_documents(kinds, 0, text_experiment.KIND_SHARES) == task.splits


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 10, 101, 5000])
def test_quotas_add_up_follow_the_shares_and_leave_no_part_empty(n):
    shares = [0.3, 0.3, 0.3, 0.1]
    counts = text_experiment.quotas(n, shares)
    assert sum(counts) == n and all(c >= 0 for c in counts)
    if n >= 4:
        assert min(counts) >= 1
    if n >= 10:
        assert all(abs(c - s * n) < 1 for c, s in zip(counts, shares))


def test_fingerprint_covers_exactly_the_pretraining_text(task, monkeypatch):
    fp = task.fingerprint()
    assert fp == text_experiment.make_text_task(0).fingerprint() != text_experiment.make_text_task(1).fingerprint()
    assert fp == data.digest(task.pretrain_documents)
    pretrained = set(task.pretrain_documents)
    assert set(text_experiment.stdlib_corpus().general) <= pretrained                    # all the general prose
    for kind, parts in task.splits.items():                                   # and only PRETRAIN parts
        assert set(parts["pretrain"]) <= pretrained
        assert not pretrained & set(parts["shadow"] + parts["train"] + parts["test"]), kind
    corpus = text_experiment.stdlib_corpus()
    edited = corpus._replace(general=corpus.general[:-1] + [corpus.general[-1] + " (edited)"])
    monkeypatch.setattr(text_experiment, "stdlib_corpus", lambda: edited)
    assert text_experiment.make_text_task(0).fingerprint() != fp                     # a change re-runs pretraining


# -----------------------------------------------------------------------------
# windows and batches


def test_windows_cover_the_text_once():
    text = "".join(chr(32 + i % 90) for i in range(1000))
    ws = text_experiment.windows(text.encode(), 65)
    assert all(len(w) <= 65 for w in ws) and len(ws) == math.ceil((len(text) - 1) / 64)
    assert ws[0] + "".join(w[1:] for w in ws[1:]) == text          # neighbours share one byte
    utf8 = text_experiment.windows(("é" * 100).encode(), 65)                   # 2-byte characters: never cut in half
    assert all(len(w.encode()) <= 65 and set(w) <= {"é"} for w in utf8)


def test_random_windows_are_whole_windows_of_the_text():
    text = "".join(np.random.default_rng(1).choice(list("abcdefgh"), size=1000))
    ws = text_experiment.windows(text.encode(), 65, n=50, rng=np.random.default_rng(0))
    assert len(ws) == 50 and all(len(w) == 65 and w in text for w in ws)
    assert len(set(ws)) > 40                                        # at random offsets, not one place
    assert ws == text_experiment.windows(text.encode(), 65, n=50, rng=np.random.default_rng(0))


def test_every_example_is_a_window_of_its_own_text(task):
    T = task.block_size
    clients = task.clients(n_train=100_000, n_test=100, group_size=1)
    assert [c["name"] for c in clients] == task.domains == ["code", "comments", "reference"]
    assert {c["kind"] for c in clients} == {"domain"}
    private = {d: [text_experiment.joined(task.splits[d][name]) for name in ("train", "test")] for d in task.domains}
    for c in clients:
        train_text, test_text = private[c["group"]]
        assert len(c["test"]) == 100 and len(c["train"]) == math.ceil((len(train_text) - 1) / T)  # all of it
        assert all(0 < len(w.encode()) <= T + 1 and w.isascii() for w in c["train"] + c["test"])
        assert all(w in train_text for w in c["train"]) and all(w in test_text for w in c["test"])
        assert c["mixture"] == np.eye(len(task.domains))[c["index"]].tolist()
    capped = task.clients(n_train=50, n_test=20)
    assert [len(c["train"]) for c in capped] == [50] * 3 and [len(c["test"]) for c in capped] == [20] * 3
    pair = task.clients(n_train=100_000, n_test=10, group_size=2)
    assert [c["name"] for c in pair[:2]] == ["code/0", "code/1"]
    assert pair[0]["train"] + pair[1]["train"] == clients[0]["train"]     # members split their domain


def test_shadow_subsets_follow_their_mixture_over_the_shadow_pool(task):
    pool = {d: text_experiment.joined(task.splits[d]["shadow"]) for d in task.domains}
    mixture, examples = task.shadow_subset(3, 3000, alpha=3.0)
    assert mixture.shape == (3,) and abs(mixture.sum() - 1) < 1e-9
    assert all(len(w.encode()) == task.block_size + 1 for w in examples)
    found = np.zeros(3)
    for w in examples[::10]:                                      # 300 of them: substring search is slow
        homes = [i for i, d in enumerate(task.domains) if w in pool[d]]
        assert homes                      # (not "and w not in private": docstrings share sentences)
        found[homes[0]] += 1
    assert np.abs(found / found.sum() - mixture).max() < 0.1
    first = np.zeros(3)                                           # in any order: the first ones too
    for w in examples[:100]:
        first[next(i for i, d in enumerate(task.domains) if w in pool[d])] += 1
    assert np.abs(first / 100 - mixture).max() < 0.15
    again, same = task.shadow_subset(3, 3000, alpha=3.0)
    assert (again == mixture).all() and same == examples


def test_encode_masks_exactly_the_predicted_bytes(task):
    x, y, mask = task.encode(["abc", "é!", "z" * 65])
    eot, T = task.enc.eot_token, task.block_size
    assert x.shape == y.shape == mask.shape == (3, T)
    assert x[0, :3].tolist() == list(b"abc") and y[0, :2].tolist() == list(b"bc")
    assert y[1, :2].tolist() == list("é!".encode())[1:] and (x[1, 3:] == eot).all()
    assert mask[0].tolist() == [1, 1] + [0] * (T - 2)              # 'b' and 'c' are predicted, padding is not
    assert mask[1].sum() == 2 and mask[2].sum() == T
    with pytest.raises(ValueError, match="block_size"):
        task.encode(["z" * 66])


def test_pretrain_batch_is_shifted_pretraining_text(task):
    x, y, mask = task.pretrain_batch(8, np.random.default_rng(0))
    text = text_experiment.joined(task.pretrain_documents).encode()
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert xr[1:] == yr[:-1] and bytes(xr + yr[-1:]) in text
    assert mask.shape == x.shape and (mask == 1).all()


def test_relabelled_is_one_window(task):
    prompt = task.prompt("p" * 65)
    assert prompt == "p" * 32
    assert task.relabelled(prompt, "c" * 40) == "p" * 32 + "c" * 33
    odd = task.relabelled(prompt, "é" * 40)                          # cut on a character boundary
    assert len(odd.encode()) <= 65 and odd.startswith(prompt) and set(odd[32:]) == {"é"}


# -----------------------------------------------------------------------------
# the metric


def test_a_model_that_knows_nothing_scores_log2_257_bits_per_byte(task):
    model = tinylm.GPT(tinylm.GPTConfig(block_size=task.block_size))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                                            # every logit 0: uniform over 257 tokens
    examples = task.clients(n_train=10, n_test=7)[0]["test"] + ["ab"]
    assert evaluation.bits_per_byte(task, model, examples) == pytest.approx(math.log2(257), abs=1e-5)


def test_bits_per_byte_matches_a_loop_over_positions(task):
    torch.manual_seed(0)
    model = tinylm.GPT(tinylm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=task.block_size)).eval()
    examples = ["hello, world", "x" * 65, "def f():\n    return 1\n"]
    bits, count = 0.0, 0
    for e in examples:                                           # each byte after the first, given its prefix
        ids = torch.tensor([list(e.encode())])
        logp = model(ids[:, :-1])[0][0].log_softmax(-1)            # (len - 1, 257)
        bits -= sum(logp[t, ids[0, t + 1]].item() for t in range(ids.shape[1] - 1)) / math.log(2)
        count += ids.shape[1] - 1
    assert evaluation.bits_per_byte(task, model, examples) == pytest.approx(bits / count, rel=1e-5)


# -----------------------------------------------------------------------------
# --text_path: the user's own file


def test_text_path_reads_pieces_into_contiguous_sections(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(user_text(), encoding="utf-8")
    corpus = text_experiment.file_corpus(str(path))
    assert list(corpus.kinds) == ["part1", "part2", "part3", "part4"] and corpus.general == []
    flat = [p for ps in corpus.kinds.values() for p in ps]
    assert "\n\n".join(flat) == path.read_text(encoding="utf-8").strip()   # all of it, in order
    assert all(len(p.encode()) <= text_experiment.PIECE_BYTES for p in flat)
    sizes = [len(text_experiment.joined(ps).encode()) for ps in corpus.kinds.values()]
    assert max(sizes) - min(sizes) < 0.05 * sum(sizes)                  # about equal parts
    task = text_experiment.make_text_task(0, str(path))
    assert task.domains == ["part1", "part2", "part3", "part4"]
    assert any(not w.isascii() for c in task.clients(1000, 1000) for w in c["train"])


def squeeze(text):
    return "".join(text.split())


@pytest.mark.parametrize("text", [
    "one single paragraph without blank lines " * 1000,                        # one huge paragraph
    "\n".join(f"line {i}: no blank line anywhere in this file" for i in range(400)),
    "\n\n".join(f"tiny {i}" for i in range(2000)),                              # many tiny paragraphs
    "x" * 3000 + "\n\n" + "é" * 6000 + "\n\n" + "word " * 2000,                  # words longer than a piece
])
def test_any_utf8_file_of_the_minimum_size_runs(tmp_path, text):
    path = tmp_path / "any.txt"
    path.write_text(text, encoding="utf-8")
    chunks = text_experiment.pieces(text)
    assert squeeze("".join(chunks)) == squeeze(text)                     # nothing lost, nothing added
    assert all(0 < len(c.encode()) <= text_experiment.PIECE_BYTES for c in chunks)
    task = text_experiment.make_text_task(0, str(path))                          # every part big enough
    assert all(len(c["test"]) > 0 and len(c["train"]) > 0 for c in task.clients(100, 100))


def test_a_real_license_file_runs():
    path = os.path.join(text_experiment.sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if not os.path.isfile(path):
        pytest.skip("this Python ships no LICENSE.txt")
    task = text_experiment.make_text_task(0, path)                               # ~14 KB of very uneven paragraphs
    assert len(task.domains) == 4


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    (b"", "0 bytes"),
    (b"\n\n   \n", "0 bytes"),
    ("é".encode("latin-1") * 20_000, "not UTF-8"),
    (b"short paragraph\n\n" * 100, "expected at least 10,000"),
])
def test_bad_text_files_are_rejected_clearly(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        text_experiment.make_text_task(0, str(path))
    assert "--text_path=" in str(err.value) and "expected" in str(err.value)


def test_cli_says_what_is_wrong_with_a_file_in_one_line_and_exits_2(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("far too short\n")
    done = subprocess.run([sys.executable, "experiments/text.py", "--preset=text_smoke", f"--text_path={path}",
                           f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gradtx: --text_path={path}: 13 bytes of text: expected at least 10,000 (fine-tuning gains "
        "need ~20 KB of private text per section)"]


def test_cli_refuses_a_text_path_without_the_text_task():
    for argv in (["--text_path=mine.txt"], ["--task=poetry"], ["--preset=smoke", "--text_path=mine.txt"]):
        with pytest.raises(SystemExit, match="expected task 'arith' or 'text'"):
            train.parse_args(argv)
    assert train.parse_args(["--preset=text", "--text_path=mine.txt"]).task == "text"


# -----------------------------------------------------------------------------
# the protocol end to end on text, at toy size


def check_text_results(results, domains):
    assert results["task"] == "text" and results["metric"] == "bits_per_byte"
    assert results["higher_is_better"] is False
    assert [c["name"] for c in results["clients"]] == domains
    for c in results["clients"]:
        assert {"llm_base", "tinylm_ft", "llm_ft", "gradtx", "mean_shadow", "ridge", "public_llm", "w2s",
                "w2s_conf", "vissup", "kd"} == set(c["scores"])
        assert all(0 < v < 9 and math.isfinite(v) for v in c["scores"].values()), c["scores"]


def test_text_protocol_end_to_end(tmp_path):
    results = text_experiment.main(TINY_RUN + ["--shadow_alpha=3", f"--out={tmp_path}"])
    check_text_results(results, ["code", "comments", "reference"])
    head, _, llm_base, *_ = evaluation.results_table(results).splitlines()
    assert head.startswith("| method | gain of means | code: gain | comments: gain | reference: gain | code: bpb")
    assert llm_base.startswith("| llm_base | ") and "| 0.00 | 0.00 | 0.00 |" in llm_base   # its own gain: none


def test_text_path_end_to_end(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(user_text(), encoding="utf-8")
    results = text_experiment.main(TINY_RUN + [f"--text_path={path}", f"--out={tmp_path / 'run'}"])
    check_text_results(results, ["part1", "part2", "part3", "part4"])
    assert results["config"]["text_path"] == str(path)
