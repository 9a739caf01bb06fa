"""Request and response bodies of the HTTP API (API.md). Imports no torch.

The literal values of ``operator.kind`` and ``method.name`` are the registry keys
(``operators.OPERATORS``, ``guidance.METHODS``); since the registries import torch, the app
builds the request model with ``make_request_model(kinds, names)`` so that OpenAPI lists the
valid choices.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**63 - 1
ReturnName = Literal["mean", "std", "samples"]
JobState = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled", "expired"]
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


# ----------------------------------------------------------------------------- arrays
class NpyArray(BaseModel):
    """A ``.npy`` file, base64: numeric or bool dtypes only, never pickled objects."""

    model_config = ConfigDict(extra="forbid")
    npy: str


class PngArray(BaseModel):
    """A PNG image, base64: 8-bit maps to [0, 1] by /255, 16-bit by /65535."""

    model_config = ConfigDict(extra="forbid")
    png: str


class TiffArray(BaseModel):
    """A TIFF image, base64: 8-bit /255, 16-bit /65535, float as is."""

    model_config = ConfigDict(extra="forbid")
    tiff: str


class FileArray(BaseModel):
    """In a multipart request: the name of the file part holding the array (.npy, .png, .tif)."""

    model_config = ConfigDict(extra="forbid")
    file: str


#: An array in a request: a nested list of numbers, or one of the encodings above.
ArrayIn = Union[list, NpyArray, PngArray, TiffArray, FileArray]


class EncodedArray(BaseModel):
    """An array in a response."""

    npy: str = Field(description="base64 of a .npy file")
    shape: list[int]
    dtype: str = "float32"


# ----------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    code: str
    message: str


class Error(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------- models, methods, operators
class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    kind: Literal["image", "pde", "analytic"]
    shape: list[int]
    channels: list[str]
    pde: dict[str, Any] | None = None
    prior: dict[str, Any] | None = None
    value_range: Any = None
    description: str = ""
    training: dict[str, Any] | None = None
    methods: list[dict[str, Any]] = []


class ModelList(BaseModel):
    models: list[ModelCard]


class MethodInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    summary: str
    paper: str
    parameters: dict[str, Any]
    nfe_per_step: int


class MethodList(BaseModel):
    methods: list[MethodInfo]


class OperatorInfo(BaseModel):
    kind: str
    observation_shape: str
    schema_: dict[str, Any] = Field(alias="schema")


class OperatorList(BaseModel):
    operators: list[OperatorInfo]


# ----------------------------------------------------------------------------- jobs
class Progress(BaseModel):
    step: int = 0
    total: int = 0


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    status: JobState
    progress: Progress
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None


class ResultMetrics(BaseModel):
    data_residual: float = Field(description="||y - A(mean)|| / ||y|| in physical units")
    pde_residual: float | None = Field(None, description="relative PDE residual of the mean (PDE models)")
    completed: bool = Field(False, description="u was re-solved from each sample's a (physics completion)")


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")
    mean: EncodedArray | None
    std: EncodedArray | None
    samples: EncodedArray | None
    metrics: ResultMetrics
    nfe: int = Field(description="network evaluations spent (shared by the jobs of a batch)")
    elapsed_s: float
    seed: int
    model: str
    method: dict[str, Any]
    batched_with: int = Field(1, description="jobs that shared these network evaluations (1 = alone)")


# ----------------------------------------------------------------------------- request
def make_request_model(operator_kinds: Sequence[str], method_names: Sequence[str]) -> type[BaseModel]:
    """The body of ``POST /v1/jobs`` and ``POST /v1/reconstruct``, with registry keys as literals."""
    OperatorKind = Literal[tuple(operator_kinds)]  # type: ignore[valid-type]
    MethodName = Literal[tuple(method_names)]  # type: ignore[valid-type]

    class OperatorSpec(BaseModel):
        """``{"kind": ..., ...parameters}``; see ``GET /v1/operators`` for each kind's schema."""

        model_config = ConfigDict(extra="allow")
        kind: OperatorKind  # type: ignore[valid-type]

    class MethodSpec(BaseModel):
        """``{"name": ..., "steps": ..., ...parameters}``; see ``GET /v1/methods``."""

        model_config = ConfigDict(extra="allow")
        name: MethodName | None = None  # type: ignore[valid-type]
        steps: int | None = Field(None, ge=1)

    class PDESpec(BaseModel):
        """``{"kind": <the model's PDE>, ...overrides}``: adds the PDE-residual term."""

        model_config = ConfigDict(extra="allow")
        kind: str | None = None

    class ReconstructionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        model: str = Field(description="a model id from GET /v1/models")
        operator: OperatorSpec
        observation: ArrayIn
        noise_sigma: float = Field(0.0, ge=0, allow_inf_nan=False)
        pde: PDESpec | None = None
        method: MethodSpec | None = None
        num_samples: int = Field(1, ge=1)
        seed: int = Field(0, ge=0, le=MAX_SEED)
        return_: list[ReturnName] = Field(default_factory=lambda: ["mean", "std"], alias="return")
        completion: Literal["auto", "solve", "off"] = Field(
            "auto", description="PDE models: re-solve u from each sample's a; auto = when u is unobserved")

        @model_validator(mode="before")
        @classmethod
        def _null_means_default(cls, data):
            if isinstance(data, dict):
                return {k: v for k, v in data.items()
                        if not (v is None and k in ("noise_sigma", "num_samples", "seed", "return", "completion"))}
            return data

    return ReconstructionRequest
