"""Helpers for kdzoo's one-paragraph user errors (:class:`kdzoo.KDZooError`).

Torch-free, so that the command line, config parsing and the plugin manager can phrase errors
without importing torch.
"""
from __future__ import annotations

import difflib
from typing import Any


def suggest(name: str, choices: Any) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices``, or an empty string."""
    name, choices = str(name), [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    close += [c for c in choices if c not in close and len(c) > 1 and (name.startswith(c) or c.startswith(name))][:2]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for a one-paragraph error), or ``"no detail"``."""
    return str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
