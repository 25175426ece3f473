"""Errors a user can cause: each carries one clear line for the terminal.

Opening an image fails in one of a few ways, each with one message form and one exit status
shared by every command that opens an image (``info``, ``verify``, ``analyze``, ``translate``,
``export``); docs/image-format.md has the table:

==========================  =============================================  ======
kind                        message (after ``collect:``)                   status
==========================  =============================================  ======
usage error                 ``COMMAND: error: ...`` (argparse's own line)   2
cannot open                 ``PATH: cannot open: REASON``                   5
not an image                ``PATH: not a memory image: WHY``               6
truncated                   ``PATH: truncated: WHAT ENDS WHERE``            3
corrupted                   ``PATH: corrupted: WHAT``                       1
unsupported                 ``PATH: unsupported: WHAT``                     7
==========================  =============================================  ======

3 and 1 keep the meaning `collect verify` gives them (incomplete; damaged).
"""

#: Exit statuses of the kinds of failure, by name (see the table above).
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TRUNCATED = 3
EXIT_CANNOT_OPEN = 5
EXIT_NOT_AN_IMAGE = 6
EXIT_UNSUPPORTED = 7


class CollectorError(Exception):
    """An error that ends a command with one line on stderr and a non-zero exit.

    :param message: the one line shown to the user.
    :param exit_code: the process exit status (2 for usage errors, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CollectorError):
    """A command or an option was given wrongly (exit status 2); raised by a plugin for an
    option it can only check once it runs, it ends the analysis with that one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_USAGE)


class ImageError(CollectorError):
    """An image is truncated, corrupted, hostile or not an image at all."""


class _ImageFailure(ImageError):
    """One kind of failure to open an image: ``PATH: KIND: DETAIL``, with the kind's status."""

    kind = ""
    status = EXIT_ERROR

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {self.kind}: {detail}", self.status)
        self.path = path
        self.detail = detail


class CannotOpenImage(_ImageFailure):
    """The file is missing, not readable, or not a regular file (a directory, a FIFO...)."""

    kind = "cannot open"
    status = EXIT_CANNOT_OPEN


class NotAnImage(_ImageFailure):
    """The file is empty or starts with the magic of no format read here."""

    kind = "not a memory image"
    status = EXIT_NOT_AN_IMAGE


class ImageTruncated(_ImageFailure):
    """The file ends inside the headers a reader needs before it can serve any page."""

    kind = "truncated"
    status = EXIT_TRUNCATED


class ImageCorrupted(_ImageFailure):
    """The headers are all there but contradict themselves or the file."""

    kind = "corrupted"
    status = EXIT_ERROR


class UnsupportedImage(_ImageFailure):
    """A known format in a variant not read here (a compression, a header version, a split
    or flattened dump), or an operation the format cannot support (verifying a format
    without checksums)."""

    kind = "unsupported"
    status = EXIT_UNSUPPORTED


class NotApplicable(CollectorError):
    """A plugin or an operation does not apply to this image; the message says why."""


class BrokenStructure(ImageError):
    """A kernel data structure in the image is inconsistent: a list that loops without
    returning to its head, runs longer than any real one, or holds a NULL or poisoned link;
    a tree node of an impossible type. Images are hostile; every walker is bounded."""
