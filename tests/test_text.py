"""Tests for the text task (data.TextTask): the corpus and its split, windows, bits per byte on a
hand-made case, bad --text_path files, and the protocol end to end on text at toy size.

Oracles: Python's own UTF-8 bytes and substring search for the windows, set algebra for the splits,
log2(257) for a model that knows nothing, a loop over positions for bits per byte.

Run:  python -m pytest tests/test_text.py -q
"""
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

import data
import eval as evaluation
import tinylm
import train


@pytest.fixture(scope="module")
def task():
    return data.make_task("text", 0)


def user_text(n_paragraphs=400):
    """A made-up UTF-8 document of ~35 KB: numbered paragraphs, some with non-ASCII characters."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu café naïve".split()
    rng = np.random.default_rng(0)
    return "\n\n".join(f"Paragraph {i}. " + " ".join(rng.choice(words, size=12)) for i in range(n_paragraphs)) + "\n"


# -----------------------------------------------------------------------------
# the corpus and who holds which document


def test_corpus_is_deterministic_ascii_and_big_enough(task):
    domains = data.stdlib_documents()
    assert list(domains) == list(data.FAMILIES)
    assert data.stdlib_documents.__wrapped__() == domains          # built again from scratch: the same
    docs = [d for ds in domains.values() for d in ds]
    assert len(docs) == len(set(docs)) > 1000                      # each text once
    assert all(d.isascii() and len(d) >= data.MIN_DOC_CHARS for d in docs)
    assert 0.8e6 < sum(map(len, docs)) < 1.5e6                     # ~1 MB of documentation
    for domain, parts in task.splits.items():                      # >= ~20 KB each
        assert len(data.joined(parts["train"])) > 20_000, domain


def test_split_is_disjoint_complete_and_seeded(task):
    domains = data.stdlib_documents()
    for domain, docs in domains.items():
        parts = [set(task.splits[domain][name]) for name in data.SHARES]
        assert sum(map(len, parts)) == len(set().union(*parts)) == len(docs)   # no document in two parts
        assert set().union(*parts) == set(docs)
    n_docs = sum(map(len, domains.values()))
    for name, share in data.SHARES.items():                                    # a fair draw per document
        assert abs(sum(len(p[name]) for p in task.splits.values()) / n_docs - share) < 0.03, name
    other = data.split_documents(domains, 1)
    assert set(other["net"]["shadow"]) != set(task.splits["net"]["shadow"])    # the seed decides
    assert data.split_documents(domains, 0) == task.splits


def test_fingerprint_follows_the_public_text_and_the_python_version(task, monkeypatch):
    fp = task.fingerprint()
    assert fp == data.make_task("text", 0).fingerprint() != data.make_task("text", 1).fingerprint()
    monkeypatch.setattr(data.sys, "version", "9.99.0 (made up)")
    assert task.fingerprint() != fp


# -----------------------------------------------------------------------------
# windows and batches


def test_windows_cover_the_text_once():
    text = "".join(chr(32 + i % 90) for i in range(1000))
    ws = data.windows(text.encode(), 65)
    assert all(len(w) <= 65 for w in ws) and len(ws) == math.ceil((len(text) - 1) / 64)
    assert ws[0] + "".join(w[1:] for w in ws[1:]) == text          # neighbours share one byte
    utf8 = data.windows(("é" * 100).encode(), 65)                   # 2-byte characters: never cut in half
    assert all(len(w.encode()) <= 65 and set(w) <= {"é"} for w in utf8)


def test_random_windows_are_whole_windows_of_the_text():
    text = "".join(np.random.default_rng(1).choice(list("abcdefgh"), size=1000))
    ws = data.windows(text.encode(), 65, n=50, rng=np.random.default_rng(0))
    assert len(ws) == 50 and all(len(w) == 65 and w in text for w in ws)
    assert len(set(ws)) > 40                                        # at random offsets, not one place
    assert ws == data.windows(text.encode(), 65, n=50, rng=np.random.default_rng(0))


def test_every_example_is_a_window_of_its_own_text(task):
    T = task.block_size
    clients = task.clients(n_train=100_000, n_test=100, group_size=1)
    assert [c["name"] for c in clients] == task.domains and {c["kind"] for c in clients} == {"domain"}
    private = {d: [data.joined(task.splits[d][name]) for name in ("train", "test")] for d in task.domains}
    for c in clients:
        train_text, test_text = private[c["group"]]
        assert len(c["test"]) == 100 and len(c["train"]) == math.ceil((len(train_text) - 1) / T)  # all of it
        assert all(0 < len(w.encode()) <= T + 1 and w.isascii() for w in c["train"] + c["test"])
        assert all(w in train_text for w in c["train"]) and all(w in test_text for w in c["test"])
        assert c["mixture"] == np.eye(len(task.domains))[c["index"]].tolist()
    capped = task.clients(n_train=50, n_test=20)
    assert [len(c["train"]) for c in capped] == [50] * 6 and [len(c["test"]) for c in capped] == [20] * 6
    pair = task.clients(n_train=100_000, n_test=10, group_size=2)
    assert [c["name"] for c in pair[:2]] == ["net/0", "net/1"]
    assert pair[0]["train"] + pair[1]["train"] == clients[0]["train"]     # members split their domain


def test_shadow_subsets_follow_their_mixture_over_the_shadow_pool(task):
    pool = {d: data.joined(task.splits[d]["shadow"]) for d in task.domains}
    mixture, examples = task.shadow_subset(3, 3000, alpha=3.0)
    assert mixture.shape == (6,) and abs(mixture.sum() - 1) < 1e-9
    assert all(len(w.encode()) == task.block_size + 1 for w in examples)
    found = np.zeros(6)
    for w in examples[::10]:                                      # 300 of them: substring search is slow
        homes = [i for i, d in enumerate(task.domains) if w in pool[d]]
        assert homes                      # (not "and w not in private": docstrings share sentences)
        found[homes[0]] += 1
    assert np.abs(found / found.sum() - mixture).max() < 0.1
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
    text = "".join(data.joined(p["pretrain"]) for p in task.splits.values()).encode()
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


def test_text_path_reads_paragraphs_into_contiguous_sections(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(user_text(), encoding="utf-8")
    sections = data.file_documents(str(path))
    assert list(sections) == ["part1", "part2", "part3", "part4"]
    flat = [p for ps in sections.values() for p in ps]
    assert flat == [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]  # all, in order
    sizes = [len(data.joined(ps).encode()) for ps in sections.values()]
    assert max(sizes) - min(sizes) < 0.02 * sum(sizes)                  # about equal parts
    task = data.make_task("text", 0, str(path))
    assert task.domains == ["part1", "part2", "part3", "part4"]
    assert any(not w.isascii() for c in task.clients(1000, 1000) for w in c["train"])


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    (b"", "0 bytes"),
    (b"\n\n   \n", "0 bytes"),
    ("é".encode("latin-1") * 20_000, "not UTF-8"),
    (b"short paragraph\n\n" * 100, "expected at least 10,000"),
    (b"one single paragraph without blank lines " * 1000, "bytes of pretrain / shadow / train / test"),
])
def test_bad_text_files_are_rejected_clearly(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        data.make_task("text", 0, str(path))
    assert "--text_path=" in str(err.value) and "expected" in str(err.value)


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
                "w2s_conf", "kd"} == set(c["scores"])
        assert all(0 < v < 9 and math.isfinite(v) for v in c["scores"].values()), c["scores"]


def test_text_protocol_end_to_end(tmp_path):
    results = train.main(TINY_RUN + ["--task=text", "--shadow_alpha=3", f"--out={tmp_path}"])
    check_text_results(results, list(data.FAMILIES))


def test_text_path_end_to_end(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(user_text(), encoding="utf-8")
    results = train.main(TINY_RUN + ["--task=text", f"--text_path={path}", f"--out={tmp_path / 'run'}"])
    check_text_results(results, ["part1", "part2", "part3", "part4"])
    assert results["config"]["text_path"] == str(path)
