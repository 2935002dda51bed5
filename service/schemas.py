"""Field types every request body shares, each bounded before anything is allocated.

Numbers are strict (`true` is not a seed, `1.5` is not a class, `"1"` is not a float; an
integer is a float) and every number has a range,
so a body like `{"n": 10**25}` is refused by validation instead of building a 10**25-long list.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, Strict, TypeAdapter, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from service.digits import count_from_text, version_from_text
from service.settings import Settings


def bounded_by_setting(field: str) -> WrapValidator:
    """For a number whose type's bound is the most any server may be set to take, where the route
    checks the server's own (lower) setting: past the type's bound pydantic said "less than or
    equal to 100000" for `steps` where the server took 1000 (a hostile probe), naming a limit not in
    force. Now the message names the setting (`field` of Settings) and its default."""
    setting, default = f"GANSERVE_{field.upper()}", Settings.model_fields[field].default

    def refuse_in_the_settings_words(value: object, handler: ValidatorFunctionWrapHandler) -> object:
        try:
            return handler(value)
        except ValidationError as error:
            if any(problem["type"] == "less_than_equal" for problem in error.errors()):
                raise PydanticCustomError("less_than_equal", f"at most {setting} (the server's setting, {default} by default)") from None
            raise
    return WrapValidator(refuse_in_the_settings_words)


MAX_SEED = 2**63 - 1
HARD_MAX_IMAGES = 4096  # the most any setting may allow per request; the server's own limit is lower
MAX_WS = 64  # style layers a request may name
MAX_W_DIM = 4096
# the largest magnitude of a latent or image value a client may send (v1's w vectors, every float
# input of v2's infer): far past any latent or pixel a generator was trained on, and small enough
# that no forward pass overflows float32 into infinities and NaN
MAX_INPUT_MAGNITUDE = 1e4

Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED, description="0 … 2^63 - 1")]
ImageCount = Annotated[int, Strict(), Field(ge=1, le=HARD_MAX_IMAGES, description="at most GANSERVE_MAX_IMAGES_PER_REQUEST (the server's "
                      f"setting, {Settings.model_fields['max_images_per_request'].default} by default); {HARD_MAX_IMAGES} is the most it may be set to"),
                      bounded_by_setting("max_images_per_request")]
ClassIndex = Annotated[int, Strict(), Field(ge=0, le=1_000_000)]
ClassName = Annotated[str, Field(min_length=1, max_length=128)]
LayerIndex = Annotated[int, Strict(), Field(ge=0, lt=MAX_WS)]
Layers = Literal["coarse", "middle", "fine"] | Annotated[list[LayerIndex], Field(min_length=1, max_length=MAX_WS)]
WValue = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-MAX_INPUT_MAGNITUDE, le=MAX_INPUT_MAGNITUDE)]
WVector = Annotated[list[WValue], Field(min_length=1, max_length=MAX_W_DIM)]
Psi = Annotated[float, Strict(), Field(ge=0.0, le=2.0, allow_inf_nan=False, description="style models: pull w toward w_avg (1 = off)")]
BigGANTruncation = Annotated[float, Strict(), Field(gt=0.0, le=1.0, allow_inf_nan=False,
                                           description="BigGAN models: z truncated to ±2 and scaled by this, with its batch-norm statistics")]
ImageFormat = Literal["png", "jpeg", "webp", "npy"]
Layout = Literal["grid", "list"]
Version = Annotated[int, Strict(), Field(ge=1, lt=2**31)]
# integers a client writes as text, in a path or a query: ASCII digits only (`1.0` is not version 1;
# the bounds come before the validator, or the OpenAPI schema loses them)
VersionText = Annotated[int, Field(ge=1, lt=2**31), BeforeValidator(version_from_text)]
VERSION_TEXT = TypeAdapter(VersionText)  # a version read from a path or query by hand (checks made before a body is read)
ProjectionSteps = Annotated[int, Field(ge=1, le=100_000), BeforeValidator(count_from_text), bounded_by_setting("max_projection_steps")]
