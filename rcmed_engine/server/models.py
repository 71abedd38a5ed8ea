"""The pydantic schemas of API v1: what requests may hold and what the OpenAPI document promises back.

The answers themselves are written as compact JSON by the routes (errors.json_response); these models
describe them for /v1/openapi.json and validate the request bodies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

API = "v1"
ID_PATTERN = "^[0-9a-f]{64}$"      # an image id: the SHA-256 of its wire form
JOB_PATTERN = "^[0-9a-f]{32}$"

Axis = Literal["axial", "coronal", "sagittal"]
Codec = Literal["zstd", "gzip"]


class ErrorModel(BaseModel):
    error: str


class HealthModel(BaseModel):
    status: str
    ready: bool
    version: str
    error: str | None = None


class GeometryModel(BaseModel):
    origin: list[float] = Field(min_length=3, max_length=3)
    spacing: list[float] = Field(min_length=3, max_length=3)
    direction: list[float] = Field(min_length=9, max_length=9)


class ImageModel(BaseModel):
    id: str
    shape: list[int]
    dtype: str
    geometry: GeometryModel
    meta: dict[str, str]
    existed: bool = False


class PackedMask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: int = Field(ge=1, le=255)
    bbox: list[int] = Field(min_length=6, max_length=6)
    codec: Literal["zstd", "gzip", "none"] = "zstd"
    data: str = Field(max_length=1 << 28)


class LabelMapModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(min_length=3, max_length=3)
    masks: list[PackedMask] = Field(max_length=255)


class ArrayModel(BaseModel):
    dtype: str
    shape: list[int]
    codec: str
    data: str


class ResultModel(BaseModel):
    prompt: str
    targets: list[str]
    answer: str
    modality: str
    axis: str
    slices: list[int]
    geometry: GeometryModel
    labels: LabelMapModel
    presence: ArrayModel
    timings: dict[str, float]
    provenance: dict[str, str]


class SegmentResponse(BaseModel):
    image: str
    results: list[ResultModel]


class JobModel(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    error: str | None
    error_kind: str | None
    version: int
    image: str
    prompts: list[str]
    created: float
    finished: float | None


class JobsModel(BaseModel):
    jobs: list[JobModel]


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(pattern=ID_PATTERN, description="an image id from POST /v1/images")
    prompt: str | None = Field(None, max_length=100_000, description="what to segment, e.g. 'liver and spleen'")
    prompts: list[str] | None = Field(None, min_length=1, max_length=64,
                                      description="several prompts on one image (instead of prompt)")
    modality: str | None = Field(None, max_length=64, description="CT, MR, X-ray... (default: from the image)")
    axis: Axis = "axial"
    slices: list[int | None] | None = Field(None, min_length=2, max_length=2,
                                            description="[A, B): voxel indices along the cut axis")
    registry: bool | None = Field(None, description="use the server's class registry (one-shot adaptation); "
                                                    "default: when the server has one")
    codec: Codec = "zstd"
    job: bool = Field(False, description="always answer with a job, even for one slice")
    idempotency_key: str | None = Field(None, max_length=128,
                                        description="a retried request with the same key returns the same job")


Ras = Annotated[list[float], Field(min_length=3, max_length=3, description="R, A, S in mm (patient space)")]


class ClickModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ras: Ras
    label: Literal["include", "exclude"] = "include"
    target: str | None = Field(None, max_length=500, description="a target of the prompt (default: its first)")


class BoxModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corners_ras: list[Ras] = Field(min_length=2, max_length=2, description="two opposite corners on one slice")
    target: str | None = Field(None, max_length=500)


class PreviousModel(BaseModel):
    """The result to correct. With targets, axis and slices (a SegmentResult's), a clicked slice outside its
    slices is segmented first; a bare label map counts as covering every slice."""
    model_config = ConfigDict(extra="forbid")
    labels: LabelMapModel
    geometry: GeometryModel | None = Field(None, description="the label map's geometry (default: the image's); "
                                                             "another grid than the image's is refused")
    targets: list[str] | None = Field(None, min_length=1, max_length=255)
    axis: Axis | None = None
    slices: list[int] | None = Field(None, min_length=2, max_length=2)


class RefineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=100_000, description="the prompt whose mask the clicks correct")
    clicks: list[ClickModel] = Field(default_factory=list, max_length=256)
    boxes: list[BoxModel] = Field(default_factory=list, max_length=64)
    previous: PreviousModel | None = Field(None, description="the result to correct (default: the text's own)")
    propagate: bool = Field(True, description="carry each correction to the neighbouring slices")
    modality: str | None = Field(None, max_length=64)
    axis: Axis = "axial"
    slices: list[int | None] | None = Field(None, min_length=2, max_length=2,
                                            description="[A, B): the range segmented and carried in")
    text: bool = Field(True, description="use the prompt's words (false: clicks alone, for comparison)")
    codec: Codec = "zstd"


class PrepareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modality: str | None = Field(None, max_length=64)
    axis: Axis = "axial"
    slices: list[int] | None = Field(None, max_length=1 << 16)


class PrepareResponse(BaseModel):
    keys: list[str]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(pattern=ID_PATTERN)
    mask: LabelMapModel
    name: str = Field(min_length=1, max_length=200)
    label: int | None = Field(None, ge=1, le=255)
    axis: Axis = "axial"
    slice: int | None = Field(None, ge=0, description="the slice along axis (default: the largest mask area)")
    modality: str | None = Field(None, max_length=64)


class ClassesModel(BaseModel):
    classes: list[Any]


class ClassModel(BaseModel):
    name: str
    info: Any = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorModel, "description": text} for code, text in (
        (400, "malformed input"), (401, "missing or wrong bearer token"), (404, "unknown id"),
        (409, "not possible in the current state"), (413, "over a configured limit"),
        (422, "invalid request"), (501, "not available in this engine"), (503, "not ready or too busy; retry"))
}


def responses(*extra: int, **models: Any) -> dict[int | str, dict[str, Any]]:
    """A route's documented answers: the common errors, the ``extra`` ones, and ``_200=Model`` style successes."""
    out = {c: ERRORS[c] for c in (400, 401, 404, 413, 422, 503) + extra}
    for code, model in models.items():
        out[int(code[1:])] = {"model": model}
    return out

