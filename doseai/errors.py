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
