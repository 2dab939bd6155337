"""The stand-in's `vllm.exceptions`: `VLLMValidationError` as vLLM 0.33 defines it (not a ValueError)."""


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    def __init__(self, message, *, parameter=None, value=None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value
