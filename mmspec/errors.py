"""Named errors raised for bad input.

Glossary: every error here subclasses ``ValueError`` (or ``TypeError``) so callers who
catch the builtin keep working, while tests and users can match the specific class.
"""

from __future__ import annotations


class MMSpecError(ValueError):
    """Base class for mmspec input errors."""


class VocabularyMismatchError(MMSpecError):
    """Drafter and target disagree on the vocabulary (size or tokenizer)."""


class DeviceMismatchError(MMSpecError):
    """Tensors or models that must share a device do not."""


class EmptyPromptError(MMSpecError):
    """A prompt (row) has no tokens."""


class InvalidSamplingError(MMSpecError):
    """Sampling parameters out of range (temperature < 0, top_p outside (0, 1], ...)."""


class InvalidDraftLengthError(MMSpecError):
    """Number of draft tokens k < 1 or otherwise unusable."""


class InvalidLengthError(MMSpecError):
    """max_new_tokens <= 0 or inconsistent lengths."""


class ShapeError(MMSpecError):
    """A tensor does not have the documented shape or dtype."""


class TokenIdError(MMSpecError):
    """A token id outside the vocabulary [0, V) (prompt ids, drafted ids inside ``num_draft``)."""


class NonFiniteError(MMSpecError):
    """NaN or +inf where finite numbers are required (logits, pixel values, scales, parameters, a training
    step's loss or gradient norm)."""


class MethodParameterError(MMSpecError):
    """A parameter the chosen method does not use, or a value the method cannot take."""


class InvalidWeightsError(MMSpecError):
    """Combination weights that are not finite, negative, do not sum to 1, or do not match the models."""
