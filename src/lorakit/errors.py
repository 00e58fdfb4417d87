"""One exception type for mistakes a user can fix; the CLI prints its message on one line and exits 2."""


class LorakitError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""


class ConfigError(LorakitError, ValueError):
    """One or more invalid configuration values, all reported together."""

    def __init__(self, problems: list[str], what: str = "config") -> None:
        self.problems = problems
        super().__init__(f"invalid {what}: " + "; ".join(problems))
