"""User-facing errors. Each message is one line: what is wrong and what to do.

The CLI prints ``error: <message>`` and exits non-zero for any EdgeSDKError;
anything else is a bug and keeps its traceback.
"""


class EdgeSDKError(Exception):
    """Base class for errors caused by user input or the environment."""

    exit_code = 2


class SourceError(EdgeSDKError):
    """The model source (folder, hub id, .gguf) is missing, unreadable or corrupt."""


class UnsupportedArchitectureError(EdgeSDKError):
    """The model's architecture is not one edgesdk can export."""


class ArtifactError(EdgeSDKError):
    """An exported artifact is missing, incomplete, corrupt or tampered with."""


class ChecksumError(ArtifactError):
    """A file of an artifact does not match the sha256 in its manifest."""


class TargetError(EdgeSDKError):
    """Unknown target, invalid profile, or a target this machine cannot run."""


class ContextOverflowError(EdgeSDKError):
    """The prompt plus new tokens do not fit in the model's context."""


class InvalidArgumentError(EdgeSDKError, ValueError):
    """A parameter has an invalid value (sampling settings, precision, ...)."""


class OutputExistsError(EdgeSDKError):
    """The export destination exists and --force was not given."""


class ModelBusyError(EdgeSDKError):
    """A Model is asked for a second generation while one is still streaming."""


class EnvironmentMismatchError(EdgeSDKError):
    """This machine cannot run the artifact: an onnxruntime too old for its graph, too little memory."""
