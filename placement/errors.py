"""The one exception type for mistakes a user can make; the CLI prints its message as a single line."""


class PlacementError(ValueError):
    """A user-caused problem. The message says what is wrong and what to do, in one line."""
