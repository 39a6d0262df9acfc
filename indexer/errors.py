"""Exceptions the indexer raises; each message says what was wrong and what to do."""

from __future__ import annotations


class IndexerError(ValueError):
    """Input the indexer cannot work with (a bad card, corpus, path or argument)."""


class CardError(IndexerError):
    """A model card with one or more problems, each reported by field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"model card {source} has {len(problems)} problem(s):\n{listing}")


class CorpusError(IndexerError):
    """A corpus that cannot be indexed (missing/duplicate ids, ragged inputs, bad dtypes)."""


class IndexNotFoundError(IndexerError):
    """No index (or no published version) where one was asked for."""


class IndexCorruptError(IndexerError):
    """An index version whose files are missing, truncated or inconsistent."""


class IndexMismatchError(IndexerError):
    """An index used with another model, corpus or vector dimension than it was built for."""
