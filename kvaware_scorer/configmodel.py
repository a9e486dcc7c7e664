"""The base of every config model (`ConfigModel`) and `load_model`: pydantic errors as `ConfigError`.

Every model forbids unknown keys (the error names the key), accepts both the camelCase name used
in upstream llm-d YAML and the Python snake_case name, and raises a `ConfigError` listing every
problem in the shared form of `kvaware_scorer.configio`, never pydantic's raw
``ValidationError``. `kvaware_scorer.config` re-exports everything here; the indexer's own
models, the gateway's, the EPP's and every plugin's parameters build on it.
"""

from __future__ import annotations

import contextvars
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from kvaware_scorer.configio import config_error, errors_of, validation_errors
from kvaware_scorer.errors import ConfigError

__all__ = ["ConfigModel", "format_validation_error", "load_model"]

#: How many config-model validations are running in this context: pydantic builds nested models
#: through their ``__init__`` too, and only the outermost one turns errors into a `ConfigError`
#: (inner ones must stay ``ValidationError`` so pydantic can place them under their field).
_VALIDATING: contextvars.ContextVar[int] = contextvars.ContextVar("kvaware_validating", default=0)


class ConfigModel(BaseModel):
    """Base for every config model: camelCase aliases, snake_case accepted, unknown keys refused.

    Raises:
        ConfigError: From the constructor and `model_validate`: every problem, each with its
            path (a `ConfigErrorGroup` when there are several).
    """

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        validate_default=True,
    )

    def __init__(self, /, **data: Any) -> None:
        depth = _VALIDATING.get()
        token = _VALIDATING.set(depth + 1)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if depth:
                raise
            raise config_error(validation_errors(exc, type(self))) from None
        finally:
            _VALIDATING.reset(token)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Pydantic's `model_validate`, raising `ConfigError` instead of ``ValidationError``."""
        depth = _VALIDATING.get()
        token = _VALIDATING.set(depth + 1)
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            if depth:
                raise
            raise config_error(validation_errors(exc, cls)) from None
        finally:
            _VALIDATING.reset(token)


M = TypeVar("M", bound=BaseModel)


def format_validation_error(
    exc: ValidationError, path: str = "", model: type[BaseModel] | None = None
) -> ConfigError:
    """Turn a pydantic error into a `ConfigError` listing every problem with its path.

    Args:
        exc: The pydantic error.
        path: Path of the validated mapping (prefixed to every error's path).
        model: The validated model (lets unknown keys list the valid ones).
    """
    return config_error(validation_errors(exc, model, path))


def load_model(model: type[M], data: Any, path: str = "") -> M:
    """Validate `data` into `model`, raising `ConfigError` (every problem, each with its path)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, path, model) from None
    except ConfigError as exc:
        if not path:
            raise
        raise config_error(
            [ConfigError(e.message, f"{path}.{e.path}" if e.path else path) for e in errors_of(exc)]
        ) from None
