"""The project's own errors. The CLI turns any of these into one line on
stderr and a non-zero exit; anything else is a bug and keeps its traceback."""

FIRST_LINE_CHARS = 160  # of an exception's message quoted inside one of ours


def first_line(error: BaseException, limit: int = FIRST_LINE_CHARS) -> str:
    """The first line of an exception's message, cut to `limit` characters, for a one-line error;
    its type name when the message is empty (str(KeyError()) is '')."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= limit else line[:limit] + "..."


class MnistCnnError(Exception):
    """Base class: a problem the user can fix; the message says how."""

    exit_code = 2


class DataError(MnistCnnError):
    """A data file is missing, malformed, or fails its checksum."""


class ConfigError(MnistCnnError):
    """A recipe or override has an unknown key, a wrong type or a bad value."""


class CheckpointError(MnistCnnError):
    """A checkpoint file is unreadable, truncated or of the wrong kind."""


class ImageError(MnistCnnError):
    """An image given to `predict` cannot be used."""


class ExportError(MnistCnnError):
    """An export could not be written or does not match torch."""


class OutputError(MnistCnnError):
    """An output cannot be written (a read-only or full disk, a folder where a file goes), would
    replace one of the command's inputs or a file the tool did not write, or its folder is busy."""


class TrainingError(MnistCnnError):
    """Training cannot go on (for example the loss is no longer finite)."""

    exit_code = 3


class Diverged(TrainingError):
    """The loss became NaN or infinite: a property of the settings (tune records such a trial failed)."""
