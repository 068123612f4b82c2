"""Typed errors. Each is a ValueError subclass with a message meant for the user; the CLI prints it
on one line and the server maps it to an OpenAI-shaped error."""


class ModelLoadError(ValueError):
    """The model could not be found, downloaded, parsed or matched to the architecture."""


class ContextLengthError(ValueError):
    """A request does not fit the model's context (prompt + max_tokens > max_model_len)."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its model step or its post-processing raised); the
    engine and every other request carry on. Not the user's fault: the server answers 500."""
