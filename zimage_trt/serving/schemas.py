"""The HTTP API's bodies: OpenAI's Images API (``POST /v1/images/generations``) with this
engine's extensions (``seed``, ``negative_prompt``, ``workflow``), the native workflow run, and
OpenAI's error shape. Unknown fields are refused by name, so a typo is never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage_trt.sampling.noise import SEED_MAX

MAX_PROMPT_CHARS = 32_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraChoice(_Body):
    name: str = Field(min_length=1, max_length=200, description="a LoRA the server registered")
    strength: float | None = Field(
        default=None, ge=-10.0, le=10.0, description="default: the strength it was registered with"
    )


class ImagesRequest(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    n: int = Field(default=1, ge=1, description="images to make (at most the server's --max-n)")
    size: str | None = Field(
        default=None,
        description="WIDTHxHEIGHT of the final image, multiples of 16 (default: the workflow's)",
        examples=["672x864"],
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = Field(default=None, description="the served model's id (GET /v1/models)")
    user: str | None = Field(default=None, max_length=256, description="ignored")
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="image i uses seed + i (default: random)"
    )
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    workflow: str | None = Field(
        default=None, max_length=200, description="a preset workflow name (default: the served one)"
    )
    lora: list[LoraChoice] | None = Field(
        default=None,
        max_length=8,
        description="LoRAs the server registered (serve --lora), in place of the served "
        "workflow's; [] for none (default: the served workflow's)",
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int = Field(description="the first stage's seed: `zimage-trt generate --seed` remakes it")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class WorkflowRunRequest(_Body):
    workflow: str | dict[str, Any] = Field(
        description="a workflow as YAML text, a JSON object, or a ComfyUI API graph"
    )
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seed: int | list[int] | None = Field(
        default=None, description="the first stage's seed, or the first stages' seeds in order"
    )


class StageImage(BaseModel):
    b64_json: str
    stage: str
    kind: Literal["preview", "final"]


class WorkflowRunResponse(BaseModel):
    created: int
    data: list[StageImage]
    timings: dict[str, float]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zimage-trt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraCard(BaseModel):
    name: str
    strength: float = Field(description="the strength a request gets when it names none")
    sha256: str = Field(description="of the file, read when the server started")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]
    held: list[str] = Field(description="the LoRAs the engines hold now (name or file, strength)")


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    backend: str | None = None
    device: str | None = None
    workflow: str | None = None
    detail: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
