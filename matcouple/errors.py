"""Exceptions that carry a message a user can act on."""

from __future__ import annotations


class MatcoupleError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class DatabaseUnavailableError(MatcoupleError):
    """The MongoDB server named in the LaunchPad file does not answer."""


class ServerStartError(MatcoupleError):
    """The embedded database server could not be started."""


class PortInUseError(ServerStartError):
    """Something other than matcouple's embedded server listens on the configured port."""


class StructureInputError(MatcoupleError, ValueError):
    """A structure (CIF/POSCAR text or file) cannot be used; the message names why."""


class DatasetError(MatcoupleError):
    """A data set file is missing or has no usable columns."""


class CheckpointError(MatcoupleError):
    """A model checkpoint is missing, unreadable or was made for another model or data."""


class GenerationError(MatcoupleError, ValueError):
    """A generation request cannot be met (bad composition, n, element); names why."""
