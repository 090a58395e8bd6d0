"""Domain errors. The library raises these; only the CLI (``actmerge/cli/``) turns them into exit codes.

Every message says what was wrong and what to do about it.
"""


class ActmergeError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class RecipeError(ActmergeError):
    """The recipe YAML or one of its data files is invalid."""

    exit_code = 2


class ModelResolutionError(ActmergeError):
    """The model argument could not be resolved to a local safetensors checkpoint."""

    exit_code = 2


class CacheError(ModelResolutionError):
    """actmerge's snapshot cache (``ACTMERGE_CACHE``) cannot give a model: a damaged entry, an
    unwritable cache, another process's conversion that does not finish."""

    exit_code = 2


class UnknownArchitectureError(ActmergeError):
    """The model's ``model_type`` has no row in the site table."""

    exit_code = 2


class SiteError(ActmergeError):
    """A site name or layer selection does not exist for this architecture."""

    exit_code = 2


class NotFoldableError(ActmergeError):
    """Part of a map cannot be folded exactly into this architecture / runtime set."""

    exit_code = 3


class MapsMismatchError(ActmergeError):
    """A maps file does not match the model (modules or dimensions)."""

    exit_code = 2


class ActivationError(ActmergeError):
    """Collected activations are unusable (NaN/Inf, empty)."""

    exit_code = 4


class OutputExistsError(ActmergeError):
    """The output directory exists, or would overwrite the source."""

    exit_code = 2


class CheckpointFormatError(ActmergeError):
    """A checkpoint file is unreadable: truncated or garbage safetensors, invalid config.json."""

    exit_code = 2


class OutputError(ActmergeError):
    """The output cannot be written: not writable, disk full, locked by another actmerge process."""

    exit_code = 8


class ExportError(ActmergeError):
    """A checkpoint cannot be exported to (or run in) llama.cpp as asked."""

    exit_code = 7


class VerificationError(ActmergeError):
    """The baked checkpoint does not reproduce the hooked model within tolerance."""

    exit_code = 5


class PublishError(ActmergeError):
    """A checkpoint cannot be published to the Hub (not verified, not an actmerge output, no token, refused)."""

    exit_code = 6


class PlacementError(ActmergeError):
    """The device / device map / memory budget / offload folder for loading a model is invalid."""

    exit_code = 2


class GatedModelError(ModelResolutionError):
    """A gated Hub model (Gemma, Llama, …) refused the download: licence not accepted or not logged in."""

    exit_code = 2


class DistributedError(ActmergeError):
    """Another process of a torchrun / accelerate launch failed: its message and exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
