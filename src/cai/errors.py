"""User-facing errors: one line, exit code 2, no traceback (see cli.main)."""


class UserError(Exception):
    """A problem with the user's input (file, field, flag) that they can fix.

    The message must name the input and the fix. The CLI prints it on one line and exits 2.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message.replace("\n", " ").strip())
