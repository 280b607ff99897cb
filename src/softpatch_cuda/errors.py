"""Library exceptions shared by the API, the demo and the command line."""


class UsageError(ValueError):
    """A mistake in how a command or a run was asked for (a wrong option, an output
    folder that is not ours, too much noise for the data): the CLI exits with code 2."""


class WeightsUnavailableError(FileNotFoundError, RuntimeError):
    """Pretrained backbone weights could not be obtained (offline, no cached copy, no
    weights file): a missing input, so the CLI exits with code 2 and names the options.
    (Also a RuntimeError, what 0.1 raised.)"""
