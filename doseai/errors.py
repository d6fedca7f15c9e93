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


class OutputExistsError(DoseAIError):
    """An output file exists and overwriting was not requested."""
