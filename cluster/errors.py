"""Errors of the cluster package (it imports nothing else of neurotask)."""


class ClusterConfigError(ValueError):
    """The config's ``cluster:`` section is wrong; each problem names its option.

    ``problems`` holds one line per problem (the message is those lines), so that a caller
    reporting a whole config file can list them with the file's other problems."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems: list[str] = list(problems)
