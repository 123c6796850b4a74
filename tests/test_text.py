"""data=text: the vocabulary, the token windows, the held-out tail, and each bad input as one
sentence (and exit status 2 through the real command)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from dpbp.data import DataConfig, load_dataset
from dpbp.errors import ConfigError
from dpbp.text import load_text, windows


def write_text(path, n: int = 6000, seed: int = 0) -> str:
    """A deterministic English-like text of about n characters (sentences from a tiny grammar)."""
    g = torch.Generator().manual_seed(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "every child", "she", "he"]
    verbs = ["sees", "likes", "finds", "paints", "follows", "reads", "builds"]
    objects = ["the river", "a small house", "the red ball", "a long letter", "the garden"]
    words = []
    while sum(len(w) + 1 for w in words) < n:
        s, v, o = (int(torch.randint(len(x), (1,), generator=g)) for x in (subjects, verbs,
                                                                          objects))
        words.append(f"{subjects[s]} {verbs[v]} {objects[o]}.")
    text = " ".join(words)[:n]
    path.write_text(text, encoding="utf-8")
    return text


def test_windows_are_the_next_tokens():
    ids = torch.arange(11)
    x, y = windows(ids, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_vocab_split_and_windows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcabcXabcab", encoding="utf-8")  # 39 chars
    t = load_text(str(path), context=4, test_fraction=0.25)
    # training part: the first 39 - 9 = 30 characters; the tail holds the unseen X
    assert t.vocab == "abc"
    assert t.dropped == 1
    decode = "".join
    assert decode(t.vocab[i] for i in t.train_x[0].tolist()) == "abca"
    assert decode(t.vocab[i] for i in t.train_y[0].tolist()) == "bcab"
    assert t.train_x.shape == ((30 - 1) // 4, 4) and t.train_x.dtype == torch.int64
    assert torch.equal(t.train_x[:, 1:], t.train_y[:, :-1])
    # the test windows come from the tail only, without the X
    assert decode(t.vocab[i] for i in t.test_x.flatten().tolist()) == "abca"  # of "abcXabcab"
    assert decode(t.vocab[i] for i in t.test_y.flatten().tolist()) == "bcab"


def test_dataset_is_a_language_model_dataset(tmp_path):
    path = tmp_path / "t.txt"
    text = write_text(path)
    ds = load_dataset(DataConfig(name="text", path=str(path), context=16, augment="none"))
    assert ds.task == "lm" and ds.mean is None and ds.context == 16
    assert ds.num_classes == len(set(text[:len(text) - len(text) // 10]))
    assert ds.example(2).dtype == torch.int64 and ds.example(2).shape == (2, 16)


@pytest.mark.parametrize("content,settings,match", [
    (None, {}, "needs a text file: set data.path"),
    ("missing", {}, "is not a file"),
    (b"\xff\xfe\x00bad", {}, "is not UTF-8 text"),
    ("short text", {"context": 64}, "fewer than one context"),
    ("a" * 200, {"context": 0}, "data.context must be a positive integer"),
    ("a" * 200, {"test_fraction": 1.5}, "must lie between 0 and 1"),
    ("ab" * 100 + "c" * 40, {"context": 16, "test_fraction": 0.2}, "occur in the training text"),
])
def test_bad_text_input_is_one_sentence(tmp_path, content, settings, match):
    path = None
    if content is not None:
        path = tmp_path / "t.txt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content != "missing":
            path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=match) as e:
        load_dataset(DataConfig(name="text", path=None if path is None else str(path),
                                augment="none", **settings))
    assert "\n" not in str(e.value)


def test_augmenting_text_is_refused(tmp_path):
    path = tmp_path / "t.txt"
    write_text(path)
    with pytest.raises(ConfigError, match="no images to augment"):
        load_dataset(DataConfig(name="text", path=str(path), augment="crop"))


@pytest.mark.slow
def test_the_command_exits_2_with_one_sentence(tmp_path):
    """Through the real command (the other bad inputs raise the same ConfigError above)."""
    path = tmp_path / "t.txt"
    path.write_text("too short for a context", encoding="utf-8")
    r = run_cli("train", "model=gpt", "data=text", f"data.path={path}", "device=cpu",
                "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "fewer than one context" in lines[0]
