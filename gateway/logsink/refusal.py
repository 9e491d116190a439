"""The one exception of the query side: a request the sink does not answer with data."""

from __future__ import annotations


class QueryRefused(Exception):
    """A query that is not run, or not finished, with a code and a sentence for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
