"""The one exception type for errors a user can cause (bad names, files, flags, prompts)."""


class MinirtError(Exception):
    """A user-facing error: the message says what went wrong and what to do.

    The CLI prints it on one line and exits non-zero; library users catch it.
    """
