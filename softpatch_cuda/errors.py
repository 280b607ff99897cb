"""Library exceptions shared by the API, the demo and the command line."""


class UsageError(ValueError):
    """A mistake in how a command or a run was asked for (a wrong option, an output
    folder that is not ours, too much noise for the data): the CLI exits with code 2."""
