"""Request and response bodies of the HTTP API (API.md). Imports no torch.

The request's ``operator`` block is the union of the operator kinds' wire models
(``service.api.operators.wire_spec``), discriminated by ``kind``, and ``method`` the union of the
methods' request models (``service.api.methods.method_model``), discriminated by ``name``, or a
block without a name (the model card's default method). Since the registries import torch, the app
builds the request model with ``make_request_model(OPERATORS, METHODS)`` (or their keys) at start.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Sequence, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WrapValidator, model_validator

from .callbacks import MAX_URL, parse_callback

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
    """A TIFF image, base64: 8-bit /255, 16-bit /65535, float as is; several pages are slices."""

    model_config = ConfigDict(extra="forbid")
    tiff: str


class NiftiArray(BaseModel):
    """A NIfTI-1/2 file (.nii or .nii.gz), base64: axes x, y, z become W, H, D; scl_slope and
    scl_inter applied."""

    model_config = ConfigDict(extra="forbid")
    nifti: str


class DicomArray(BaseModel):
    """A zip of one DICOM series, base64: slices ordered by position along the slice normal,
    rescale slope and intercept applied."""

    model_config = ConfigDict(extra="forbid")
    dicom: str


class FileArray(BaseModel):
    """In a multipart request: the name of the file part holding the array (.npy, .png, .tif,
    .nii, .nii.gz, a DICOM .zip; told apart by content)."""

    model_config = ConfigDict(extra="forbid")
    file: str


#: An array in a request: a nested list of numbers, or one of the encodings above.
ArrayIn = Union[list, NpyArray, PngArray, TiffArray, NiftiArray, DicomArray, FileArray]


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


class ParameterInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    default: Any = Field(description="the method's generic default (a model card may run another: tuned)")
    meaning: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    choices: list[str] | None = None
    unit: str | None = Field(None, description="absent: a pure number")
    per_channel: bool = Field(False, description="takes one number, or a list of one per channel")


class MethodInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    summary: str
    paper: str
    parameters: dict[str, Any] = Field(description="each parameter's generic default")
    parameter_info: dict[str, ParameterInfo] = Field(default_factory=dict)
    tuned: dict[str, Any] | None = Field(None, description="with ?model=: the parameters that model's card runs "
                                                          "the method with (null: the card does not recommend it)")
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


class CallbackState(BaseModel):
    """A callback's delivery (``service/callbacks.py``): every attempt is counted here."""

    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int = Field(description="POSTs made (or in flight)")
    last_status: int | None = Field(description="the HTTP status of the last answer; null: none came")
    delivered_at: str | None
    error: str | None = Field(description="why the last attempt did not deliver")


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    status: JobState
    progress: Progress
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None
    callback: CallbackState | None = Field(None, description="the job's callback, when it names one")


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(description="newest first")
    next_page_token: str | None = Field(description="pass as page_token for the next page; null: the last page")


class ResultMetrics(BaseModel):
    data_residual: float | None = Field(description="||y - A(mean)|| / ||y|| in physical units (null if "
                                        "not finite, e.g. when the norms overflow)")
    pde_residual: float | None = Field(None, description="relative PDE residual of the mean (PDE models)")
    completed: bool = Field(False, description="u was re-solved from each sample's a (physics completion)")
    whitened_misfit: list[float | None] | None = Field(
        None, description="per sample, ||y - A(x_k)||^2 / (m noise_sigma^2) over the m observed values: about 1 "
        "when the sample explains the data to the stated noise (null without noise)")
    observed_values: int | None = Field(None, description="m: the observation's entries the operator produces "
                                        "(unobserved pixels and unsampled k-space do not count)")
    misfit_threshold: float | None = Field(
        None, description="max(2, chi2.isf(1e-6, m) / m): the mean whitened misfit above which misfit is true")
    misfit: bool | None = Field(
        None, description="true: the samples do not explain the observation within noise_sigma (the prior cannot "
        "explain it, noise_sigma is understated, or the method has not converged); null without noise")


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
class MethodDefaults(BaseModel):
    """A method block without a name: the model card's first recommended method, with these of its
    parameters changed (see ``GET /v1/methods``; ``steps`` is every method's)."""

    model_config = ConfigDict(extra="allow")
    name: None = Field(None, description="omitted or null: the model card's default method")
    steps: int | None = Field(None, ge=1, description="sampler steps; null: the card's tuned value")


def _tagged(models: Sequence[type[BaseModel]], key: str) -> Any:
    """The union of ``models`` discriminated by their ``key`` literal (one model: itself)."""
    models = tuple(models)
    return models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator=key)]


def _method_branch(value: Any) -> str | None:
    """"named" when the block names a method, "default" when it has no name (None: not an object)."""
    if isinstance(value, dict):
        return "default" if value.get("name") is None else "named"
    if isinstance(value, BaseModel):
        return "default" if isinstance(value, MethodDefaults) else "named"
    return None


def method_union(method_models: Sequence[type[BaseModel]]) -> Any:
    """``method``: one of the methods' models (by ``name``), or ``MethodDefaults`` when it has no name."""
    return Annotated[Union[Annotated[_tagged(method_models, "name"), Tag("named")],
                           Annotated[MethodDefaults, Tag("default")]], Discriminator(_method_branch)]


def _operator_block(operators: Mapping[str, Any]):
    """Parse a known kind's block once, by its wire model; errors answer 422 ``invalid_operator``
    at once (before the request's other fields are reported)."""
    from operators.checks import OperatorSpecError

    from .api.operators import operator_error, parse_operator

    def validate(value, handler):
        if isinstance(value, dict) and isinstance(value.get("kind"), str) and value["kind"] in operators:
            try:
                return parse_operator(operators[value["kind"]], value)
            except OperatorSpecError as e:
                raise operator_error(e) from None
        return handler(value)
    return WrapValidator(validate)


def _method_block(methods: Mapping[str, Any]):
    """Parse a method block once, by the named method's model (or ``MethodDefaults``); errors
    answer 422 ``invalid_method`` at once."""
    from .api.methods import method_model, parse_method

    def validate(value, handler):
        if isinstance(value, dict):
            name = value.get("name")
            if name is None:
                return parse_method(MethodDefaults, value)
            if isinstance(name, str) and name in methods:
                return parse_method(method_model(methods[name]), value)
        return handler(value)
    return WrapValidator(validate)


class CallbackSpec(BaseModel):
    """``{"url": "https://..."}``: the job's final JobStatus is POSTed there when it ends, signed
    ``X-Reconserve-Signature: sha256=<hex HMAC-SHA256 of the body>`` (docs/API.md "Callbacks")."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=MAX_URL, description="an http or https URL")


#: ``callback`` is checked by ``service.callbacks.parse_callback`` (422 ``invalid_callback``).
CallbackBlock = Annotated[CallbackSpec | None, WrapValidator(lambda v, handler: handler(parse_callback(v)))]


class CouplingSpec(BaseModel):
    """``{"kind": "tv_z", "weight": w}``: total variation along z between denoising steps, with
    weight ``w`` in the model's units (``guidance.coupling``); for stacks of slices."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["tv_z"] = Field(description="tv_z: total variation along the slice axis")
    weight: float = Field(ge=0, le=1e6, allow_inf_nan=False, description="its weight (model units); 0: none")


def make_request_model(operators: Mapping[str, Any] | Sequence[str],
                       methods: Mapping[str, Any] | Sequence[str]) -> type[BaseModel]:
    """The body of ``POST /v1/jobs`` and ``POST /v1/reconstruct``.

    ``operators``: kind -> operator class (``operators.OPERATORS``), or kind names looked up
    there; ``methods``: name -> method (``guidance.METHODS``), or names looked up there (the
    lookups import torch; this module does not). The ``operator`` and ``method`` blocks are the
    unions of the kinds' wire models and the methods' request models (``service.api``), each
    block parsed once, by its own model.
    """
    if not isinstance(operators, Mapping):
        from operators.spec import OPERATORS
        operators = {k: OPERATORS[k] for k in operators}
    if not isinstance(methods, Mapping):
        from guidance.registry import METHODS
        methods = {k: METHODS[k] for k in methods}
    from .api.methods import method_model
    from .api.operators import wire_spec
    OperatorSpec = Annotated[_tagged([wire_spec(cls.Spec) for cls in operators.values()], "kind"),  # noqa: N806
                             _operator_block(operators)]
    MethodSpec = Annotated[method_union([method_model(m) for m in methods.values()]),  # noqa: N806
                           _method_block(methods)]

    class PDESpec(BaseModel):
        """``{"kind": <the model's PDE>, ...overrides}``: adds the PDE-residual term."""

        model_config = ConfigDict(extra="allow")
        kind: str | None = None

    class ReconstructionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)
        model: str = Field(description="a model id from GET /v1/models")
        operator: OperatorSpec = Field(description="the forward model: one of the operator kinds "
                                                    "(GET /v1/operators), by kind")
        observation: ArrayIn
        noise_sigma: float = Field(0.0, ge=0, allow_inf_nan=False)
        pde: PDESpec | None = None
        method: MethodSpec | None = Field(None, description="the sampling method, by name (GET /v1/methods); "
                                                            "omitted: the model card's first recommended method")
        num_samples: int = Field(1, ge=1)
        seed: int = Field(0, ge=0, le=MAX_SEED)
        return_: list[ReturnName] = Field(default_factory=lambda: ["mean", "std"], alias="return")
        completion: Literal["auto", "solve", "off"] = Field(
            "auto", description="PDE models: re-solve u from each sample's a; auto = when u is unobserved")
        coupling: CouplingSpec | None = Field(None, description="stacks only: couples neighbouring slices")
        value_window: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
            None, min_length=2, max_length=2, description="[lo, hi] in the data's units: mapped linearly to the "
            "card's value_range (noise_sigma in the data's units too), and the results back")
        callback: CallbackBlock = Field(None, description="POST the final JobStatus to this URL when the job ends")

        @model_validator(mode="before")
        @classmethod
        def _null_means_default(cls, data):
            if isinstance(data, dict):
                return {k: v for k, v in data.items()
                        if not (v is None and k in ("noise_sigma", "num_samples", "seed", "return", "completion"))}
            return data

    return ReconstructionRequest
