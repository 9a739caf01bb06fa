"""From a parsed request body to a validated ``Problem``: every check that answers 404/413/422.

Two phases, so that the queue is asked for room before any costly work (API.md "Admission"):

- ``admit`` (cheap, no array is decoded): unknown operator kind / method (404), the body's
  structure (422), unknown model (404), limits on steps and samples, the method's parameters
  and its cost (422).
- ``build`` (costly): arrays (413/422), the operator against the model's shape (422), the
  observation against the operator (422), the PDE block (422). It also returns the decoded
  arrays and the request with ``{"file": name}`` in their place: what the job store keeps, and
  what ``prepare`` rebuilds the same problem from after a restart.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

import torch
from pydantic import ValidationError

from guidance.params import MethodError
from guidance.registry import METHODS
from guidance.solve import Plan, plan_method
from operators.checks import OperatorSpecError
from operators.spec import OPERATORS, build_pde

from .api.methods import method_error
from .api.operators import operator_error
from .codecs import CodecError
from .callbacks import check_target
from .errors import ApiError
from .labfiles import LAB_RECORD, Decoded, Window, decode_any, lab_record, make_window
from .problem import Problem, digest
from .ranges import check_observation
from .sizes import observation_shape, pixels_per_pass, request_shape, sized_model
from .schemas import MethodDefaults
from .stack import build_volume, refuse_coupling, slice_depth


def _shape(s) -> str:
    return "[" + ",".join(str(int(v)) for v in s) + "]"


def _codec(e: CodecError) -> ApiError:
    return ApiError(e.status, e.code, str(e))


def _safe_name(part) -> str:
    """A location part as it may be shown: short identifiers and indices only."""
    s = str(part)
    return s if re.fullmatch(r"[A-Za-z_][\w\[\]]{0,39}|\d{1,9}", s) else "<field>"


def validation_message(err: ValidationError) -> str:
    """The pydantic errors as one line each, never echoing the input."""
    parts, seen_observation = [], False
    for e in err.errors(include_url=False, include_input=False, include_context=False):
        loc = [_safe_name(p) for p in e.get("loc", ())]
        field = ".".join(loc) or "body"
        if loc and loc[0] == "observation":
            if seen_observation:
                continue
            seen_observation = True
            what = "is required" if e.get("type") == "missing" and len(loc) == 1 else "expected an array"
            parts.append(f'observation: {what}; send a nested list of numbers or '
                         '{"npy": "<base64>"} ({"png"|"tiff": "<base64>"} for images, '
                         '{"file": "<part>"} in multipart requests)')
            continue
        if loc and loc[0] == "return":
            field = "return"
        kind = e.get("type", "")
        msg = e.get("msg", "invalid")
        if kind == "missing":
            msg = "is required; send it"
        elif kind in ("union_tag_not_found", "union_tag_invalid") and loc and loc[0] in ("operator", "method"):
            field, msg = (("operator.kind", f"is missing or not a kind; send one of {sorted(OPERATORS)} "
                           "(GET /v1/operators)") if loc[0] == "operator" else
                          ("method", 'expected {"name": <method>, ...parameters} or {"steps": n}; send '
                           f"a name among {sorted(METHODS)} (GET /v1/methods)"))
        elif kind == "extra_forbidden":
            msg = ("is not a field of the request; send only model, operator, observation, noise_sigma, "
                   "pde, method, num_samples, seed, return, completion, coupling, value_window, callback")
        if "send" not in msg:
            msg += "; send a value as API.md describes"
        parts.append(f"{field}: {msg}")
        if len(parts) >= 6:
            break
    return "; ".join(parts) or "the request body is invalid; see API.md"


def precheck_kinds(body: Any) -> None:
    """404 for an unknown operator kind or method name (before the structural validation)."""
    if not isinstance(body, dict):
        return
    op = body.get("operator")
    if isinstance(op, dict) and isinstance(op.get("kind"), str) and op["kind"] not in OPERATORS:
        raise ApiError(404, "unknown_operator",
                       f"operator.kind is not a known operator kind; send one of {sorted(OPERATORS)} "
                       "(GET /v1/operators)")
    m = body.get("method")
    if isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"] not in METHODS:
        raise ApiError(404, "unknown_method",
                       f"method.name is not a known method; send one of {sorted(METHODS)} (GET /v1/methods)")


def method_params(method) -> tuple[str | None, dict]:
    """``(name or None, the parameters the request sets)`` of a validated method block."""
    if method is None:
        return None, {}
    if isinstance(method, MethodDefaults):
        params = dict(method.model_extra or {}, steps=method.steps)
    else:
        params = method.model_dump(exclude_unset=True)
    name = params.pop("name", None)
    if params.get("steps") is None:  # null: the default
        params.pop("steps", None)
    return name, params


def _decode_operator(spec, settings, files, arrays: dict):
    """The parsed spec with its arrays decoded (each also put in ``arrays`` as ``operator.<k>``)."""
    decoded = {}
    for k in type(spec).array_fields():
        v = getattr(spec, k)
        if v is None:
            continue
        try:
            decoded[k] = decode_any(v, f"operator.{k}", max_elements=settings.max_array_elements, files=files).array
        except CodecError as e:
            raise _codec(e) from None
        arrays[f"operator.{k}"] = decoded[k]
    return spec.model_copy(update=decoded)


def job_cost(plan: Plan, num_samples: int, pixels) -> float:
    """Admission cost: network evaluations of one pixel (a backprop counts as two) for the run;
    ``pixels``: the values of one network pass (``sizes.pixels_per_pass``), or the image's shape."""
    c = plan.config.cost()
    n = int(pixels) if isinstance(pixels, (int, np.integer)) else math.prod(pixels)
    return float((c.network_calls + 2 * c.backprops) * int(num_samples) * n)


@dataclass
class Admission:
    """A request checked for all that is cheap to check; its cost is known."""

    body: dict
    model: Any  # models.checkpoint.LoadedModel
    shape: tuple
    operator_spec: Any  # the parsed operator block (arrays still encoded)
    plan: Plan
    num_samples: int
    seed: int
    noise_sigma: float
    returns: tuple
    completion: str
    cost: float
    window: Window = Window()  # value_window: the data's units -> the card's (service/labfiles/window.py)


def _parse(body: Any, request_model):
    """The request model's parse of the body (each block once), or ``ApiError``."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object; send "
                       '{"model": ..., "operator": {...}, "observation": ..., ...} as in API.md')
    precheck_kinds(body)
    try:
        return request_model.model_validate(body)
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e)) from None


def _plan(card: dict, model, method, settings) -> Plan:
    """The method resolved against the card, within the step and network-call limits (404/422)."""
    name, params = method_params(method)
    if int(params.get("steps", 0) or 0) > settings.max_steps:
        raise ApiError(422, "invalid_request", f"method.steps: {params['steps']} is over the limit of "
                       f"{settings.max_steps}; send at most {settings.max_steps} steps")
    try:
        plan = plan_method(card, model.denoiser, name, params)
    except KeyError as e:
        raise ApiError(404, "unknown_method", str(e).strip("'\"")) from None
    except MethodError as e:
        raise method_error(e, params, card["id"], name or "its default method") from None
    except (ValueError, TypeError, OverflowError) as e:
        msg = str(e).splitlines()[0][:300] if str(e) else "invalid value"
        raise ApiError(422, "invalid_method", f"method: {msg}; see GET /v1/methods for the parameters "
                       "and their defaults") from None
    if int(plan.config.steps) > settings.max_steps:
        raise ApiError(422, "invalid_request", f"method.steps: {plan.config.steps} is over the limit of "
                       f"{settings.max_steps}; send at most {settings.max_steps} steps")
    calls = plan.config.cost()
    if calls.network_calls > settings.max_nfe:
        raise ApiError(422, "invalid_method", f"method: the parameters plan {calls.network_calls} network "
                       f"evaluations, over the limit of {settings.max_nfe}; send fewer steps or corrector steps")
    return plan


def _check_cost(plan: Plan, num_samples: int, pixels: int, settings) -> float:
    """The job's admission cost, or 422 ``too_costly`` over ``max_job_cost``."""
    cost = job_cost(plan, num_samples, pixels)
    if cost > settings.max_job_cost:
        calls, per_sample = plan.config.cost(), cost / num_samples
        fit = int(settings.max_job_cost // per_sample)
        hint = (f"send at most {fit} samples" if fit >= 1 else
                f"send fewer steps (at most about {int(plan.config.steps * settings.max_job_cost / per_sample)})")
        raise ApiError(422, "too_costly", f"the job would cost {cost:.3g} pixel-evaluations "
                       f"({calls.network_calls} network calls and {calls.backprops} backprops per sample, "
                       f"x {num_samples} samples x {pixels} values), over the limit of "
                       f"{settings.max_job_cost:.3g}; {hint}, or split it into several jobs")
    return cost


def admit(body: Any, request_model, models: Mapping[str, Any], settings,
          files: Mapping[str, bytes] | None = None) -> Admission:
    """The cheap checks (no array decoded, no operator built): an ``Admission`` or ``ApiError``."""
    req = _parse(body, request_model)
    check_target(body.get("callback"), settings.callback_allow_private)  # 422 invalid_callback (service/callbacks.py)
    model = models.get(req.model)
    if model is None:
        raise ApiError(404, "unknown_model", f"model is not a known model id; send one of {sorted(models)} "
                       "(GET /v1/models)")
    card = model.card
    obs = observation_shape(body["observation"], files)
    if obs is not None and math.prod(obs) > settings.max_array_elements:
        obs = None  # the decoder answers it (413) with the limits
    shape = request_shape(card, OPERATORS[req.operator.kind_name()], req.operator, obs)
    if req.num_samples > settings.max_samples:
        raise ApiError(422, "invalid_request", f"num_samples: {req.num_samples} is over the limit of "
                       f"{settings.max_samples}; send at most {settings.max_samples}")
    n_out = req.num_samples * math.prod(shape)
    if n_out > settings.max_array_elements * 4:
        raise ApiError(413, "too_large", f"num_samples x model size = {n_out} values is over the limit; "
                       "send fewer samples")
    plan = _plan(card, model, req.method, settings)
    cost = _check_cost(plan, int(req.num_samples), pixels_per_pass(card, shape), settings)
    return Admission(body=body, model=model, shape=shape, operator_spec=req.operator, plan=plan,
                     num_samples=int(req.num_samples), seed=int(req.seed), noise_sigma=float(req.noise_sigma),
                     returns=tuple(dict.fromkeys(req.return_)), completion=req.completion, cost=cost)


def _operator(adm: Admission, settings, files, arrays: dict):
    """``(operator, its constructor's arguments)`` from the parsed block, arrays decoded (422)."""
    spec = _decode_operator(adm.operator_spec, settings, files, arrays)
    cls = OPERATORS[spec.kind_name()]
    try:
        kwargs = cls.check_spec(spec, adm.shape)
    except OperatorSpecError as e:
        raise operator_error(e) from None
    return cls(adm.shape, **kwargs), kwargs


def _decode_observation(adm: Admission, settings, files) -> Decoded:
    """The observation decoded (413/422): an array or a lab file (NIfTI, DICOM, TIFF stack)."""
    try:
        return decode_any(adm.body["observation"], "observation", max_elements=settings.max_array_elements,
                          files=files, scale_integers=adm.model.card.get("kind") == "image")  # uint8/16 like PNG
    except CodecError as e:
        raise _codec(e) from None


def _lab_data(adm: Admission, decoded: Decoded, arrays: dict) -> Admission:
    """``adm`` with its ``value_window`` (noise in the card's units); the observation's file
    header and the window kept with the job's arrays (``LAB_RECORD``) for results in its format."""
    window = make_window(adm.body.get("value_window"), adm.model.card)
    record = lab_record(decoded.source, window.scale, window.offset)
    if record is not None:
        arrays[LAB_RECORD] = record
    return replace(adm, window=window, noise_sigma=window.noise(adm.noise_sigma))


def _fit_observation(adm: Admission, operator, obs: np.ndarray, from_image: bool) -> np.ndarray:
    """The observation checked against the operator's observation shape (422)."""
    card, shape = adm.model.card, adm.shape
    obs_shape = tuple(int(s) for s in operator.obs_shape)
    if obs.ndim == 2 and len(obs_shape) == 3 and obs_shape[0] == 1 and obs.shape == obs_shape[1:]:
        obs = obs[None]  # a grayscale image or [H, W] array for a one-channel model
    if tuple(obs.shape) != obs_shape:
        hint = ""
        if from_image and len(obs_shape) == 3 and tuple(obs.shape[-2:]) == obs_shape[1:]:
            if obs_shape[0] == 1 and obs.ndim == 3:
                hint = " (a colour image for a one-channel model: send it as grayscale)"
            elif obs_shape[0] == 3 and obs.ndim == 2:
                hint = " (a grayscale image for a 3-channel model: send an RGB image)"
        raise ApiError(422, "shape_mismatch",
                       f"observation has shape {_shape(obs.shape)}, but operator {operator.kind} on model "
                       f"{card['id']} (shape {_shape(shape)}) observes shape {_shape(obs_shape)}; "
                       f"send an observation of shape {_shape(obs_shape)}{hint}")
    return obs


def _pde(adm: Admission) -> tuple:
    """``(the requested PDE term or None, the PDE whose residual is reported, the pde block)``."""
    card, body = adm.model.card, adm.body
    pde_spec = dict(body["pde"]) if body.get("pde") is not None else None
    if pde_spec is not None:
        try:
            pde = build_pde(pde_spec, adm.shape, card.get("pde"))
        except OperatorSpecError as e:
            raise operator_error(e, "invalid_pde") from None
        except (TypeError, ValueError) as e:
            raise ApiError(422, "invalid_pde", f"pde: {e}; send {{\"kind\": ...}} as on the model card") from None
        return pde, pde, pde_spec
    try:
        return None, (build_pde(None, adm.shape, card["pde"]) if card.get("pde") else None), None
    except (OperatorSpecError, TypeError, ValueError):
        return None, None, None


def build(adm: Admission, settings, files: Mapping[str, bytes] | None = None):
    """The costly half: ``(Problem, arrays, stored_body)``; ``stored_body`` is the request with
    every array replaced by ``{"file": name}`` for the name it has in ``arrays``."""
    arrays: dict[str, np.ndarray] = {}
    decoded = _decode_observation(adm, settings, files)
    obs, from_image, adm = decoded.array, decoded.from_image, _lab_data(adm, decoded, arrays)
    if slice_depth(obs, adm.operator_spec.kind_name(), adm.shape[0], from_image) is not None:  # service/stack.py
        spec = _decode_operator(adm.operator_spec, settings, files, arrays)
        return build_volume(adm, settings, spec, obs, arrays, _pde(adm)), arrays, stored_body(adm.body, arrays)
    refuse_coupling(adm.body)
    operator, kwargs = _operator(adm, settings, files, arrays)
    obs = arrays["observation"] = _fit_observation(adm, operator, obs, from_image)
    # entries the operator never produces (unobserved pixels, unsampled k-space) are ignored:
    # zeroed, so residuals and DPS's normalization see only what was observed
    y = operator.observed(torch.as_tensor(adm.window.observation(operator, obs), dtype=torch.float64)[None])[0]
    check_observation(adm.model.card, operator, y, adm.noise_sigma)  # 422 out_of_range (service/ranges.py)
    pde, pde_metric, pde_spec = _pde(adm)
    try:
        adm.plan.config.check(operator, pde)  # the method's own rules of fit
    except MethodError as e:
        sent = adm.body.get("method") if isinstance(adm.body.get("method"), dict) else {}
        raise method_error(e, sent, adm.model.card["id"], adm.plan.name) from None
    problem = Problem(model=sized_model(adm.model, adm.shape), operator=operator,
                      operator_digest=digest({"kind": operator.kind, **kwargs}), y=y, noise_sigma=adm.noise_sigma, pde=pde, pde_metric=pde_metric,
                      pde_digest=digest(pde_spec), plan=adm.plan, num_samples=adm.num_samples,
                      seed=adm.seed, returns=adm.returns, completion=adm.completion,
                      exclusive=adm.plan.config.exclusive(operator), cost=adm.cost)
    return problem, arrays, stored_body(adm.body, arrays)


def stored_body(body: dict, arrays: dict) -> dict:
    """The request as the job store keeps it: each array replaced by ``{"file": name}``."""
    return dict(body, observation={"file": "observation"},
                operator={k: ({"file": f"operator.{k}"} if f"operator.{k}" in arrays else v)
                          for k, v in body["operator"].items()})


def prepare(body: Any, request_model, models: Mapping[str, Any], settings,
            files: Mapping[str, bytes] | None = None) -> Problem:
    """Validate a request body into a ``Problem`` or raise ``ApiError`` (both phases)."""
    return build(admit(body, request_model, models, settings, files), settings, files)[0]
