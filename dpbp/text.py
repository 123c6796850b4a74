"""Character-level language-modelling data from one text file (`data=text data.path=FILE`).

The vocabulary is the set of characters of the training text (sorted, so a token id does not
depend on where a character first appears); the last `data.test_fraction` of the file is held out
as the test text. Each text is cut into non-overlapping windows of `data.context` tokens: sample i
is tokens [iT, iT+T) and its targets are the next tokens, [iT+1, iT+T+1). Test characters that
never occur in the training text have no token and are left out of the test text (counted in
`Text.dropped`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpbp.errors import ConfigError


@dataclass
class Text:
    """Token windows of the training and the test text, and the vocabulary."""

    train_x: torch.Tensor  # int64 (N, T) token ids
    train_y: torch.Tensor  # int64 (N, T): the token after each of train_x
    test_x: torch.Tensor
    test_y: torch.Tensor
    vocab: str  # character of each token id
    dropped: int  # test characters outside the vocabulary


def windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, next tokens) windows of `context` tokens from a 1-D id tensor."""
    n = (ids.numel() - 1) // context
    return (ids[:n * context].view(n, context).clone(),
            ids[1:n * context + 1].view(n, context).clone())


def _read(path: str | None) -> str:
    if not path:
        raise ConfigError("data=text needs a text file: set data.path=FILE (UTF-8 text).")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.path={path} is not a file; give the path of a UTF-8 text file.")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert "
                          "it to UTF-8 or choose another file.") from None
    except OSError as e:
        raise ConfigError(f"cannot read data.path={path} ({e.strerror}); check the file.") \
            from None


def load_text(path: str | None, context: int, test_fraction: float) -> Text:
    """Read `path` and cut it into training and test windows of `context` tokens.

    Raises ConfigError (one sentence) for a missing or unreadable file, a text that is not
    UTF-8, bad settings, or a training or test part shorter than one context plus one character.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"data.context must be a positive integer, got {context!r}.")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction={test_fraction!r} must lie between 0 and 1.")
    text = _read(path)
    cut = len(text) - int(len(text) * test_fraction)
    train, test = text[:cut], text[cut:]
    for part, what in ((train, "training part"), (test, "held-out test tail")):
        if len(part) < context + 1:
            raise ConfigError(
                f"{path}: its {what} has {len(part)} characters, fewer than one context "
                f"(data.context={context}) plus one; use a longer text or a smaller "
                "data.context.")
    vocab = "".join(sorted(set(train)))
    index = {ch: i for i, ch in enumerate(vocab)}
    kept = [index[ch] for ch in test if ch in index]
    if len(kept) < context + 1:
        raise ConfigError(f"{path}: its test tail has only {len(kept)} characters that occur in "
                          "the training text; use a longer text or a smaller data.test_fraction.")
    train_ids = torch.tensor([index[ch] for ch in train], dtype=torch.int64)
    train_x, train_y = windows(train_ids, context)
    test_x, test_y = windows(torch.tensor(kept, dtype=torch.int64), context)
    return Text(train_x, train_y, test_x, test_y, vocab, len(test) - len(kept))
