"""User-facing error types.  Messages name the file, row or config key at fault."""


class PhenoProfilerError(Exception):
    """Base class for errors caused by input data or configuration (not bugs)."""


class ConfigError(PhenoProfilerError):
    """A config key is missing, misspelt, of the wrong type or out of range."""


class ImageError(PhenoProfilerError):
    """An image file is missing, unreadable, or of the wrong shape or bit depth."""


class DataError(PhenoProfilerError):
    """A table is missing rows/columns the stage needs (e.g. a plate without controls)."""
