"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2."""


class StagewiseError(Exception):
    """A problem with the user's input or setup; the message says what is wrong and what to do."""


class MissingSourceError(StagewiseError):
    """A corpus source's files are not on this machine."""


class DataFormatError(StagewiseError):
    """Input data that cannot be read as the config says (malformed JSONL, a call outside its schema...)."""


class TokenizerMismatchError(StagewiseError):
    """Two artifacts were made with different tokenizers."""
