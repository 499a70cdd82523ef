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


class SetupError(InstarError):
    """The machine, a model file or a server cannot do the job (a teacher that crashes on this CPU, a server
    that is not running): found before any work starts. Exit code 2."""

    exit_code = 2
