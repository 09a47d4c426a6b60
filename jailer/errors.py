"""Exceptions that carry a message a user can act on; the CLI prints them as one line."""


class JailerError(Exception):
    """Base class: the CLI prints str(exc) on stderr and exits with `exit_code`."""

    exit_code = 1


class ProfileError(JailerError):
    """A profile is invalid. Carries one line per problem: 'FILE: KEY: found X, expected Y'."""

    exit_code = 2

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(JailerError):
    """The command line is wrong (unknown option, bad --fd value, ...)."""

    exit_code = 2


class LayerError(JailerError):
    """A sandbox layer the profile requires could not be applied: names the layer, why, and the fix."""

    exit_code = 3

    def __init__(self, layer, reason, fix=""):
        self.layer = layer
        self.reason = reason
        self.fix = fix
        message = f"cannot apply layer '{layer}': {reason}"
        if fix:
            message += f" (to fix: {fix})"
        super().__init__(message)
