"""Caption preprocessing of the published recipe (FNE_SPEC section 8).

Lower-case, strip the punctuation ``,.'!?"()*#:;~``, turn ``-`` and ``/`` into spaces,
collapse whitespace and keep the first ``max_words`` words. The tokenizer of the text tower
runs afterwards, so this only normalises the raw text the way the paper's numbers assume.
"""

from __future__ import annotations

import re

_STRIP = str.maketrans("", "", ",.'!?\"()*#:;~")
_SPACE = str.maketrans({"-": " ", "/": " "})
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str, lowercase: bool = True, strip_punctuation: bool = True,
                  max_words: int | None = 30) -> str:
    """Normalise one caption the way the paper's numbers assume.

    Args:
        text: the raw caption.
        lowercase: lower-case it.
        strip_punctuation: remove ``,.'!?"()*#:;~`` and turn ``-`` and ``/`` into spaces.
        max_words: keep the first this many words (None: all).

    Returns:
        The cleaned caption, words joined by single spaces; ``""`` when nothing is left
        (callers reject those).
    """
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = text.translate(_SPACE).translate(_STRIP)
    words = _WHITESPACE.split(text.strip())
    words = [w for w in words if w]
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)
