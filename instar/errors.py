"""The one exception type a user can cause.

Library code raises `InstarError` (or `ConfigError`) with a one-line reason; the CLI prints it on stderr
and exits with `exit_code`. Anything else escaping is a bug in instar and keeps its traceback.
"""


class InstarError(Exception):
    """A problem the user can fix: bad input, a missing file, a dead server. Exit code 1."""

    exit_code = 1


class ConfigError(InstarError):
    """A bad config file, key or value. Exit code 2, like a usage error."""

    exit_code = 2


class InputError(InstarError):
    """Input that cannot be used: a missing or unreadable file, an empty folder or topics file, an unreachable
    server, a model the server does not have, a teacher that crashes on this CPU. Exit code 2, like a usage error;
    raised before anything is stored."""

    exit_code = 2

