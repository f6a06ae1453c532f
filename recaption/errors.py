"""The one exception family: every error a user sees is a RecaptionError with a message they can act on."""

EXIT_ENGINE_DEAD = 75  # the status of a process ended for a dead engine (EX_TEMPFAIL: Ray replaces it, a retry works)


class RecaptionError(Exception):
    """Base of all recaption errors; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(RecaptionError):
    """A config key, value or override is wrong. The message names the key."""

    exit_code = 2


class InputError(RecaptionError):
    """An input path is missing, unreadable, empty or of an unknown format. The message names the path."""

    exit_code = 2


class EngineError(RecaptionError):
    """A captioning engine could not be built or failed as a whole."""


class EngineDeadError(EngineError):
    """The engine can serve no more requests (its process died, the GPU faulted): an infrastructure fault, never a
    failed row. The caption actor ends so Ray starts a new one, and the unit is retried."""


class OutputWriteError(RecaptionError):
    """The output directory cannot be written (full disk, no permission): no unit can be committed."""


class ImageError(RecaptionError):
    """One image could not be used; it becomes a `failed` row with this message as its `error`."""


class TrainingError(RecaptionError):
    """Training cannot go on as configured (a non-finite loss or gradient, data of which no image decodes); the
    message says what happened, what was kept and what to change."""
