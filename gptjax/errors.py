"""One exception type for mistakes a user can fix, and one way to report them.

Entry points wrap their work in `exit_on_user_error`, so a wrong config key, a missing file or an empty corpus
prints one line naming the problem and the fix instead of a traceback.
"""

import contextlib
import sys


class UserError(Exception):
    """A problem with the user's input (config, files, prompt, checkpoint); the message says how to fix it."""


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a UserError into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
