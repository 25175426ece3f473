"""Errors a user can cause: each carries one clear line for the terminal."""


class CollectorError(Exception):
    """An error that ends a command with one line on stderr and a non-zero exit.

    :param message: the one line shown to the user.
    :param exit_code: the process exit status (2 for usage errors, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CollectorError):
    """A command or an option was given wrongly (exit status 2); raised by a plugin for an
    option it can only check once it runs, it ends the analysis with that one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class ImageError(CollectorError):
    """An image is truncated, corrupted, hostile or not an image at all."""


class NotApplicable(CollectorError):
    """A plugin or an operation does not apply to this image; the message says why."""


class BrokenStructure(ImageError):
    """A kernel data structure in the image is inconsistent: a list that loops without
    returning to its head, runs longer than any real one, or holds a NULL or poisoned link;
    a tree node of an impossible type. Images are hostile; every walker is bounded."""
