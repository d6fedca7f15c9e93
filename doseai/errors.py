"""One exception type per kind of user error; messages say what to do."""


class DoseAIError(Exception):
    """Base class for errors caused by the user's input; the CLI prints them as one line."""


class UnreadableInputError(DoseAIError):
    """A file or folder is missing, corrupt, or not of the expected kind (e.g. a non-CT DICOM series)."""


class GeometryMismatchError(DoseAIError):
    """Two images that must share a grid do not (shape, spacing, origin or direction differ)."""


class MissingStructureError(DoseAIError):
    """A required structure is absent or empty (e.g. no target with a prescription)."""


class InvalidDoseError(DoseAIError):
    """A dose array holds NaN/inf or negative values."""


class InvalidImageError(DoseAIError):
    """An image holds values no CT can have (NaN, inf)."""


class MissingPackageError(DoseAIError):
    """A Python package an action needs (e.g. the dose engine pyRadPlan) is not installed."""


class OutputExistsError(DoseAIError):
    """An output file exists and overwriting was not requested."""


class CancelledError(DoseAIError):
    """The user cancelled a long computation (a progress dialog's Cancel)."""


def refuse_overwrite(path, force: bool) -> None:
    """Raise OutputExistsError if ``path`` exists and ``force`` is not set: nothing is overwritten silently."""
    from pathlib import Path

    if Path(path).exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite")


def refuse_nonempty_folder(folder, force: bool) -> None:
    """Raise OutputExistsError if ``folder`` holds anything and ``force`` is not set."""
    from pathlib import Path

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not force:
        raise OutputExistsError(f"{folder} is not empty; pass --force to overwrite")


# What a reader's parsing raises on a damaged file; at the file boundary these become the user's error. Not
# MemoryError (a real case too big for this machine is not a damaged file), nor a missing or unreadable path
# (FileNotFoundError, PermissionError: the CLI reports those as they are).
MALFORMED_INPUT_ERRORS = (AttributeError, KeyError, ValueError, TypeError, IndexError, OverflowError, EOFError,
                          ArithmeticError, OSError)


def refuse_malformed(what: str):
    """Decorate a reader whose first argument is the path: a parsing error of a damaged file (see
    MALFORMED_INPUT_ERRORS) becomes one UnreadableInputError line that names the file; our own errors pass."""
    import functools

    def decorate(read):
        @functools.wraps(read)
        def guarded(path, *args, **kwargs):
            try:
                return read(path, *args, **kwargs)
            except (DoseAIError, FileNotFoundError, PermissionError):
                raise
            except MALFORMED_INPUT_ERRORS as error:
                detail = " ".join(str(error).split())[:200] or "no detail"
                raise UnreadableInputError(f"{path}: a damaged or malformed {what} ({type(error).__name__}: "
                                           f"{detail})") from error
        return guarded
    return decorate
