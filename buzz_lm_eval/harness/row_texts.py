"""Which request text each row of a scored batch came from, so stats lines can name it.

HFLM hands ``_model_call`` only the padded token rows of a log-likelihood batch. ``RowTexts``
remembers each request's model input (``(context + continuation)[:-1]``) with the SHA-1 of its
text: the context string of a ``loglikelihood`` request, the whole document of a
``loglikelihood_rolling`` window, the two strings ``--log_samples`` shows in ``arguments``.
A row is found again by its tokens followed by HFLM's right padding (zeros).
"""

from __future__ import annotations

import hashlib

import numpy as np


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class RowTexts:
    def __init__(self) -> None:
        self._by_length: dict[int, dict[tuple[int, ...], str]] = {}
        self._documents: list[tuple[bytes, str]] = []

    def add_documents(self, token_lists: list[list[int]], texts: list[str]) -> None:
        """The rolling documents about to be scored (their windows are matched by content)."""
        pairs = zip(token_lists, texts, strict=True)
        self._documents = [(np.asarray(tokens, dtype=np.int64).tobytes(), sha1(text)) for tokens, text in pairs]

    def add_requests(self, requests) -> None:
        """HFLM's ``(strings or None, context_enc, continuation_enc)`` requests of one call."""
        for strings, context, continuation in requests:
            if strings is not None:
                digest = sha1(strings[0])
            else:  # a rolling window: the document that contains its continuation
                digest = self._document_of(continuation)
            if digest is not None:
                tokens = tuple((context + continuation)[:-1])
                self._by_length.setdefault(len(tokens), {})[tokens] = digest

    def of_rows(self, rows) -> list[str | None]:
        """The SHA-1 of each row's text (None for a row that no request produced)."""
        lengths = sorted(self._by_length, reverse=True)
        found = []
        for row in rows.tolist():
            digest = None
            for n in lengths:
                if n <= len(row) and not any(row[n:]):
                    digest = self._by_length[n].get(tuple(row[:n]))
                    if digest is not None:
                        break
            found.append(digest)
        return found

    def _document_of(self, continuation: list[int]) -> str | None:
        needle = np.asarray(continuation, dtype=np.int64).tobytes()
        for haystack, digest in self._documents:
            at = haystack.find(needle)
            while at >= 0 and at % 8:
                at = haystack.find(needle, at + 1)
            if at >= 0:
                return digest
        return None
