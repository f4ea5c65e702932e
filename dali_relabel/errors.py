"""The one base of dali-relabel's own errors.

Every error the package raises on purpose derives from :class:`DaliRelabelError` (and, for code that
caught the built-in type before, from ``ValueError`` or ``RuntimeError`` as it always did). Its
message names the file, sample or setting and says how to fix it, so the command line prints the
message alone, without a traceback (``DALI_RELABEL_TRACEBACK=1`` shows one).
"""


class DaliRelabelError(Exception):
    """Base of the errors dali-relabel raises on purpose; the message is meant for the user."""
