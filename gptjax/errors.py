"""One exception type for mistakes a user can fix, and one way to report them.

Entry points wrap their work in `exit_on_user_error`, so a wrong config key, a missing file or an empty corpus
prints one line naming the problem and the fix instead of a traceback.
"""

import contextlib
import os
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


def check_workdir(workdir: str, must_exist: bool = False) -> None:
    """A run directory must be a directory (it holds checkpoints, logs and the token cache), never a file."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file, not a directory; a workdir holds a run's checkpoints, logs "
                        f"and token cache: pass a new or existing directory")
    if must_exist and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} does not exist; pass the --workdir of a trained run")
