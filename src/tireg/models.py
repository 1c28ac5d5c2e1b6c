"""Registration models: parameters, mappings and a transform, with two gradient paths.

* :class:`AffineModel` (autograd): ``forward(source)`` warps the moving image
  by the current transform; the user sums a loss against the fixed image and
  calls ``backward()``.
* :class:`AffineModelAnalytic` (analytic): ``forward(source, target)``
  returns ``(warped, loss)`` and has already written every ``param.grad``
  by the chain rule (:mod:`tireg.analytic`); no ``backward()``.

Both hold raw parameters ``self.p`` (an ``nn.ParameterList``) and mappings
``self.m``; ``get(i) = m_i(p_i)`` is the parameter value.  Without a
subclass both are the seed's four-parameter model ``(angle, dx, dy, scale)``;
the seed's users subclass them and override ``get_matrix()`` (and, for the
analytic model, ``get_derva(i) = dA/dp_i``).  Ready-made models exist for
every built-in transform (:data:`tireg.transforms.TRANSFORMS`).

Batches: a parameter of shape ``(B,)`` holds one value per image pair; one
of shape ``(1,)`` is shared by all pairs (its gradient sums over them).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import operator
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ._device import constant, without_autocast
from ._validation import (
    GRADIENT_INTERPOLATIONS,
    PADDING_MODES,
    FiniteCheckCache,
    TensorStamp,
    beyond_float64,
    check_compile_option,
    check_image,
    check_option,
    checked_derivative,
    finite_number,
    matches,
    positive_whole,
    real_number,
)
from .analytic import _cost_and_gradient, parameter_gradient
from .losses import L2Loss, PerPixelLoss, get_loss
from .metrics import Metric, get_metric
from . import fused
from .fused import prepare_moving, supports
from .mappings import (ExpMapping, IdentityMapping, Mapping, SigmoidMapping, _sigmoid_derivatives_at_once, _sigmoid_rows,
                       _sigmoid_values_at_once, mapping_from_state, mapping_state)
from .sampling import image_gradient as compute_image_gradient
from .sampling import _pixel_axes, _stack_with_gradient, checked_warp
from .transforms import TRANSFORMS, Transform, _similarity_matrix_of_values, get_transform, image_center

__all__ = [
    "TransformModel",
    "AffineModel",
    "AffineModelAnalytic",
    "TranslationModel",
    "TranslationModelAnalytic",
    "RigidModel",
    "RigidModelAnalytic",
    "SimilarityModel",
    "SimilarityModelAnalytic",
    "AnisotropicSimilarityModel",
    "AnisotropicSimilarityModelAnalytic",
    "FullAffineModel",
    "FullAffineModelAnalytic",
    "create_model",
]

MODEL_INTERPOLATIONS = GRADIENT_INTERPOLATIONS
IMAGE_GRADIENTS = ("exact", "central", "gaussian")

#: ``compile="auto"``: an analytic model takes the compiled path once its eager steps have
#: taken this many seconds in all, about what a first compile takes (2-7 s with inductor's
#: cache warm, up to 15 s cold).  The rent-or-buy rule: a loop too short to pay for the
#: compile never compiles, and a long one spends at most about twice the time of the
#: better of the two paths chosen in advance (docs/design.md).
AUTO_COMPILE_SECONDS = 10.0


def _stack_values(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parameter values ``(B,)`` or ``(1,)``, broadcast and stacked: ``(B, P)`` (``B = 1`` when all are shared)."""
    return torch.stack(torch.broadcast_tensors(*values), dim=-1)


def _raw_gradients(
    gradient: torch.Tensor, raw: Sequence[torch.Tensor], mappings: Sequence[Mapping]
) -> list[torch.Tensor]:
    """``dL/dr_i = dL/dp_i * m_i'(r_i)`` from ``gradient = dL/dp`` ``(B, P)``; a shared ``(1,)`` parameter sums over pairs.

    An identity mapping's ``m' = 1`` is not applied, and the sums of all identity-mapped shared
    parameters (the seed's model: every parameter) come from one reduction, ``sum_b dL/dp``:
    one operation for them all, where each had taken three.  Those results are views of it.
    """
    if gradient.shape[0] == 1 and not torch.compiler.is_compiling():
        shared = _sigmoid_raw_gradients(gradient, raw, mappings)
        if shared is not None:
            return shared
    result = []
    totals = by_parameter = None
    for i, (value, mapping) in enumerate(zip(raw, mappings)):
        identity = type(mapping) is IdentityMapping
        if identity and value.numel() == 1:
            totals = gradient.sum(0) if totals is None else totals
            result.append(totals[i].reshape(value.shape))
            continue
        if identity:  # a row of dL/dp transposed once: gradient[:, i] is strided, and fused optimisers
            # (Adam(fused=True), ...) read a .grad as laid out like its parameter: pair 1 took pair 0's ty
            by_parameter = gradient.t().contiguous() if by_parameter is None else by_parameter
            raw_gradient = by_parameter[i]
        else:
            raw_gradient = gradient[:, i] * mapping.derivative(value)  # a new, contiguous tensor
        result.append(raw_gradient.sum().reshape(value.shape) if value.numel() == 1 else raw_gradient)
    return result


def _sigmoid_raw_gradients(
    gradient: torch.Tensor, raw: Sequence[torch.Tensor], mappings: Sequence[Mapping]
) -> Optional[list[torch.Tensor]]:
    """:func:`_raw_gradients` of one pair's ``gradient`` ``(1, P)`` where every mapping is a
    :class:`SigmoidMapping` and every raw value one shared ``(1,)`` (the seed's model), in one pass of
    each operation (:func:`tireg.mappings._sigmoid_rows`): the same products, and each sum of one
    term, so the same numbers; views of one new tensor.  ``None`` for any other case.  The loop had
    taken nine operations a parameter."""
    rows = _shared_sigmoid_rows(raw, mappings, gradient) if gradient.shape[1] == len(raw) else None
    if rows is None:
        return None
    return list((gradient * _sigmoid_derivatives_at_once(torch.cat(raw), rows)).sum(0).split(1))


def _shared_sigmoid_rows(raw: Sequence[torch.Tensor], mappings: Sequence[Mapping], like: torch.Tensor
                         ) -> Optional[tuple[torch.Tensor, ...]]:
    """:func:`tireg.mappings._sigmoid_rows` of the seed's case, at least two raw values each one shared
    ``(1,)`` of ``like``'s dtype and device, one :class:`SigmoidMapping` each; ``None`` for any other."""
    if len(raw) < 2 or len(mappings) != len(raw):
        return None
    if not all(value.shape == (1,) and value.dtype == like.dtype and value.device == like.device for value in raw):
        return None
    return _sigmoid_rows(mappings, like)


class _Checked:
    """A model setting checked whenever it is set, in the constructor and after (a NaN centre made
    every matrix NaN; ``interpolation = "nearest"`` set later gave zero gradients).

    ``check(value, caller)`` returns the value to keep; ``caller`` is ``"ClassName.name"``.
    """

    def __init__(self, check: Callable, doc: str):
        self.check, self.__doc__ = check, f"{doc} Checked when set."

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"
        _CHECKED_NAMES.add(name)

    def __get__(self, model, owner=None):
        if model is None:
            return self
        module = model.__dict__.get("_modules", {}).get(self.name)
        return module if module is not None else getattr(model, self.slot)

    def __set__(self, model, value) -> None:
        value = self.check(value, f"{type(model).__name__}.{self.name}")
        # a module kept before (an image_gradient of one's own); none before nn.Module.__init__ ran
        model.__dict__.get("_modules", {}).pop(self.name, None)
        model.__dict__.pop(self.slot, None)
        if isinstance(value, nn.Module):  # a child under the setting's own name: it moves with .to(), and its
            # state dict keys stay "image_gradient.*" (under the slot, "_image_gradient.*", a strict
            # load_state_dict of a state dict saved before refused it)
            nn.Module.__setattr__(model, self.name, value)
        else:
            setattr(model, self.slot, value)


#: The names of the models' checked settings (:class:`_Checked`), filled as they are defined.
_CHECKED_NAMES: set[str] = set()


def _positive_sigma(value, caller: str) -> float:
    """``sigma`` as a positive finite ``float``; raise naming it otherwise (a text sigma raised
    "'>' not supported"; one too wide for the image is :func:`tireg.sampling.image_gradient`'s check)."""
    sigma = finite_number(value, "sigma", caller)
    if not sigma > 0:
        raise ValueError(f"{caller}: 'sigma' must be positive; got {sigma:g}")
    return sigma


def _check_slots(cls: type) -> None:
    """Raise unless ``cls.transform`` is a :class:`~tireg.transforms.Transform` and ``cls.transform_slots``
    is ``None`` or a permutation of its parameters' indices."""
    transform, slots = cls.transform, cls.transform_slots
    if not isinstance(transform, Transform):
        raise TypeError(f"{cls.__name__}: 'transform' must be a tireg Transform (tireg.TRANSFORMS); "
                        f"got {type(transform).__name__}")
    count = transform.num_parameters
    if slots is not None and (isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence)
                              or not all(isinstance(slot, int) and not isinstance(slot, bool) for slot in slots)
                              or sorted(slots) != list(range(count))):
        raise ValueError(f"{cls.__name__}: 'transform_slots' must be None or a permutation of range({count}), "
                         f"the model parameter for each of the {transform.name!r} transform's {count} parameters; "
                         f"got {slots!r} (set transform_slots = None for the transform's own order)")


class TransformModel(nn.Module):
    """Parameters, mappings and the matrix ``A(p)`` with its Jacobian; the base of both models.

    Class attributes (set by the ready-made models):
        transform: the :class:`~tireg.transforms.Transform` that builds
            ``A`` and ``dA/dp`` unless a subclass overrides ``get_matrix``.
        transform_slots: for each of the transform's parameters, the index
            ``i`` of the model parameter that supplies it (``None``: same order),
            a permutation of ``range(transform.num_parameters)``.  The base's is
            the seed's order ``(0, 3, 1, 2)``; a subclass that sets another
            ``transform`` than it inherits without ``transform_slots`` takes the
            transform's own order (``None``); one that restates the inherited
            transform keeps the inherited slots.
            Checked when the subclass is defined.

    Args:
        cx, cy: centre of rotation and scaling, pixels (usually
            ``((W-1)/2, (H-1)/2)``, :func:`~tireg.transforms.image_center`).
        bordermode: padding mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        interpolation: ``"bilinear"`` (default) or ``"bicubic"``.
        batch_size: number of independent parameter sets (image pairs).
    """

    # The seed's model: parameters (angle, dx, dy, scale) feeding a similarity.
    transform: Transform = TRANSFORMS["similarity"]
    transform_slots: Optional[tuple[int, ...]] = (0, 3, 1, 2)

    def __init__(
        self,
        cx: float,
        cy: float,
        bordermode: str = "zeros",
        *,
        interpolation: str = "bilinear",
        batch_size: int = 1,
    ):
        super().__init__()
        caller = f"{type(self).__name__}()"
        self.cx, self.cy = cx, cy  # checked by the properties
        self.bordermode = bordermode  # checked by the properties
        self.interpolation = interpolation
        batch_size = positive_whole(batch_size, "batch_size", caller)
        slots = self._slots()
        initial = [0.0] * len(slots)
        for position, index in enumerate(slots):
            initial[index] = self.transform.identity[position]
        self.p = nn.ParameterList(nn.Parameter(torch.full((int(batch_size),), value)) for value in initial)
        self.m: list[Mapping] = [IdentityMapping() for _ in initial]
        self._center: tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)
        self._finite = FiniteCheckCache()

    cx = _Checked(lambda value, caller: finite_number(value, "cx", caller), "Centre x in pixels.")
    cy = _Checked(lambda value, caller: finite_number(value, "cy", caller), "Centre y in pixels.")
    interpolation = _Checked(lambda value, caller: check_option(value, MODEL_INTERPOLATIONS, "interpolation", caller),
                             '``"bilinear"`` or ``"bicubic"``.')
    bordermode = _Checked(lambda value, caller: check_option(value, tuple(PADDING_MODES), "border mode", caller),
                          'Padding mode: ``"zeros"``, ``"border"`` or ``"reflection"``.')

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # the base's slots are the seed's order for its similarity: a subclass that set only its own
        # transform had inherited them (an IndexError for a rigid, four parameters fed to an affine).
        # One that restates the transform it inherits keeps the slots it inherits: reset, the seed's
        # model restated (transform = TRANSFORMS["similarity"]) had its scale p3 read as ty
        if ("transform" in cls.__dict__ and "transform_slots" not in cls.__dict__
                and cls.__dict__["transform"] != getattr(super(cls, cls), "transform", None)):
            cls.transform_slots = None
        _check_slots(cls)

    def __setattr__(self, name: str, value) -> None:
        # a checked setting is checked whatever its value: nn.Module's own __setattr__ registered a
        # module (or a parameter) under the setting's name, past the check
        checked = getattr(type(self), name, None) if name in _CHECKED_NAMES else None
        if isinstance(checked, _Checked):
            checked.__set__(self, value)
        else:
            super().__setattr__(name, value)

    # -- parameters -----------------------------------------------------------

    def _slots(self) -> tuple[int, ...]:
        return self.transform_slots or tuple(range(self.transform.num_parameters))

    @property
    def num_parameters(self) -> int:
        """Number of parameters ``P``."""
        return len(self.p)

    def _model_order(self) -> str:
        """The base matrix's parameters in the model's order, ``"(angle, tx, ty, scale)"`` for the seed's."""
        names = self.transform.parameter_names
        slots = self._slots()
        return "(" + ", ".join(names[slots.index(i)] for i in range(len(slots))) + ")"

    def _check_mappings(self, caller: str) -> None:
        """Raise a ``ValueError`` naming ``self.m`` unless it holds one mapping per parameter: a subclass
        builds both lists by hand (the seed's), and one left short raised a bare "list index out of range"
        from ``get()``, ``set_parameter()`` and ``forward``."""
        count, mappings = len(self.p), len(self.m)
        if mappings != count:
            raise ValueError(
                f"{caller}: {type(self).__name__} has {count} parameters (self.p) but {mappings} mappings (self.m); "
                "self.m needs one mapping per parameter, in the same order: append one to self.m with each "
                "parameter added to self.p (e.g. self.m = [IdentityMapping() for _ in self.p])"
            )

    def _check_structure(self, caller: str) -> None:
        """:meth:`_check_mappings`, and where the model's matrix is the base's (its transform's), as many
        parameters as the transform takes: a subclass that replaced ``self.p`` with three and kept the
        base ``get_matrix()`` failed inside ``index_select`` ("INDICES element is out of DATA bounds"),
        and a fifth parameter was silently ignored.  Not where ``get()`` is the subclass's own: it
        may form the transform's values from more raw parameters (``get(3) = p3 * p4``)."""
        self._check_mappings(caller)
        count, expected = len(self.p), self.transform.num_parameters
        # a get() of one's own serves values its own way (the scale as p3 * p4 from five parameters):
        # how many it serves is not len(self.p), and such a model worked before this check
        if count != expected and not self._overrides(("get", "get_matrix", "_transform_parameters",
                                                      "parameter_values")):
            raise ValueError(
                f"{caller}: {type(self).__name__} has {count} parameters (self.p), but its matrix is the base "
                f"class's get_matrix(): the {self.transform.name!r} transform of {expected} parameters, in the "
                f"order {self._model_order()}. Override get_matrix() to build A from your {count} parameters "
                "(as the seed's MyModel does; for the analytic model get_derva(i) too), or set the class "
                f"attribute 'transform' to a transform of {count} parameters (tireg.TRANSFORMS)"
            )

    def _check_index(self, i: int, caller: str) -> int:
        """``i`` as an ``int`` (a NumPy integer too); raise unless it indexes a parameter: a ``TypeError``
        for what is no integer (a bool too: ``True`` had been called an index out of range), an
        ``IndexError`` for one out of range (``-3``: negative indices are not taken).  And as many
        mappings as parameters (:meth:`_check_mappings`)."""
        try:
            index = operator.index(i)
        except TypeError:
            index = None
        if index is None or isinstance(i, (bool, np.bool_)):
            raise TypeError(f"{caller}: parameter index must be an integer; got {type(i).__name__}")
        if not 0 <= index < len(self.p):
            raise IndexError(
                f"{caller}: parameter index {i!r} is out of range; "
                f"{type(self).__name__} has {len(self.p)} parameters (0..{len(self.p) - 1})"
            )
        if len(self.m) != len(self.p):
            self._check_mappings(caller)
        return index

    #: ``get(i)``'s values while an analytic step forms ``A`` and ``dA/dp`` (:meth:`_step_values`), else ``None``.
    _values: Optional[dict] = None

    def get(self, i: int) -> torch.Tensor:
        """Value of parameter ``i``: ``m_i(p_i)``, shape ``(B,)`` or ``(1,)``."""
        values = self._values
        if values is not None and type(i) is int and not torch.is_grad_enabled():
            value = values.get(i)
            if value is None and not values and self._form_values(values):  # all at once
                value = values.get(i)
            if value is None:
                value = values[i] = self.m[self._check_index(i, "get()")](self.p[i])
            return value
        i = self._check_index(i, "get()")
        return self.m[i](self.p[i])

    def _form_values(self, values: dict) -> bool:
        """Put every parameter's value into ``values`` (:meth:`_step_values`'s) at once, where that
        forms the same numbers in fewer operations: every mapping a :class:`SigmoidMapping`, every
        parameter one shared value ``(1,)`` (the seed's model; :func:`tireg.mappings._sigmoid_rows`);
        return whether it did.  Each value is a view of one new tensor of all of them: four
        mappings' 16 operations and their Python became five."""
        params = self._parameter_list()
        rows = _shared_sigmoid_rows(params, self.m, params[0]) if len(params) else None
        if rows is None:
            return False
        formed = _sigmoid_values_at_once(torch.cat(params), rows).split(1)
        values.update(enumerate(formed))
        return True

    @contextlib.contextmanager
    def _step_values(self):
        """Within it, ``get(i)`` forms each value once, without a graph (under ``no_grad``; with grad
        enabled it forms them as ever): the seed's analytic model asks for 23 values a step, its matrix
        and each ``get_derva`` the ones they use, and each had gone through the mapping again (a
        third of its step).  Nothing changes the parameters while a step forms ``A`` and ``dA/dp``;
        ``set_parameter`` clears them all the same."""
        self.__dict__["_values"] = {}
        try:
            yield
        finally:
            self.__dict__["_values"] = None

    def set_parameter(self, i: int, value: Union[float, Sequence[float], torch.Tensor], mapping: Optional[Mapping] = None) -> None:
        """Set parameter ``i`` to ``value`` (in parameter units), optionally with a new mapping.

        The raw value stored is ``mapping.solve(value)``.  A scalar fills
        the parameter's current shape; a tensor of ``B`` values gives one
        value per image pair to a parameter that holds ``B``.  The
        ``nn.Parameter`` object and its shape are kept, so an optimiser built
        before still updates it: ``B`` values for a shared ``(1,)`` parameter
        are refused (an optimiser's state kept its old shape, and its next
        step failed inside ``torch.optim``).  For one parameter set per pair,
        build the model with ``batch_size=B`` (:func:`create_model` does).
        """
        caller = "set_parameter()"
        i = self._check_index(i, caller)
        if mapping is not None and not isinstance(mapping, Mapping):
            raise TypeError(f"{caller}: 'mapping' must be a tireg Mapping; got {type(mapping).__name__}")
        mapping = self.m[i] if mapping is None else mapping
        if isinstance(value, str) or not isinstance(value, (numbers.Real, Sequence, torch.Tensor, np.ndarray)):
            raise TypeError(f"{caller}: 'value' must be a number, a sequence or a tensor; got {type(value).__name__}")
        param = self.p[i]
        if not isinstance(value, torch.Tensor):  # solved in float64: as float32 first, 0.1 on a float64
            try:                                   # model was off by 1.5e-9 (4e-8 through a sigmoid)
                value = torch.as_tensor(value, dtype=torch.float64)
            except OverflowError:  # an int such as 10**400: no float64 holds it
                raise beyond_float64("value", caller, several=not isinstance(value, numbers.Real)) from None
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{caller}: 'value' must be numbers; got {value!r}") from None
        raw = mapping.solve(value).to(dtype=param.dtype, device=param.device)  # raises before anything changes
        if raw.dim() == 0 or raw.numel() == 1:
            raw = raw.reshape(()).expand(param.shape).clone()  # a 0-d parameter (one's own) stays 0-d
        elif raw.dim() != 1:
            raise ValueError(f"{caller}: 'value' must be a scalar or a 1-D tensor of B values; got {tuple(raw.shape)}")
        else:  # one value per pair: as many as the other parameters' pairs (a shared one, 1, fits any)
            others = {int(other.shape[0]) if other.dim() else 1  # a 0-d parameter (one's own): one shared value
                      for index, other in enumerate(self.p) if index != i} - {1}
            if others and raw.shape[0] not in others:
                raise ValueError(f"{caller}: {raw.shape[0]} values for a model of {max(others)} image pairs; "
                                 "give one value, or one per pair")
            if raw.shape != param.shape:
                raise ValueError(
                    f"{caller}: parameter {i} has shape {tuple(param.shape)}; {raw.shape[0]} values change its "
                    "shape, which an optimiser built before cannot follow: build the model with "
                    f"batch_size={raw.shape[0]} for one parameter set per pair"
                )
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(f"{caller}: 'value' {value!r} gives a NaN or infinite parameter")
        self.m[i] = mapping
        if self._values:
            self._values.clear()
        with torch.no_grad():
            param.data = raw
        param.grad = None

    def get_extra_state(self) -> dict:
        """The parameter mappings, which are not tensors: a raw value means nothing without its
        mapping (a sigmoid's 0.3 came back as 0.62 after ``load_state_dict``).  Built-in mappings
        as plain data (``weights_only``-safe); one of one's own as ``None``: the loading model
        keeps its own there."""
        self._check_mappings("state_dict()")  # four mappings had been saved for five parameters
        return {"mappings": [mapping_state(mapping) for mapping in self.m]}

    def set_extra_state(self, state: dict) -> None:
        mappings = state.get("mappings") if isinstance(state, dict) else None
        if not isinstance(mappings, (list, tuple)) or len(mappings) != len(self.m):
            raise ValueError(f"{type(self).__name__}.load_state_dict(): the saved mappings {mappings!r} do not fit "
                             f"this model's {len(self.m)} parameters")
        restored = [current if entry is None else mapping_from_state(entry) for current, entry in zip(self.m, mappings)]
        self.m[:] = restored  # all or nothing: a bad entry raises above, before any mapping changes

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # as set_parameter refuses them: a NaN parameter made every later cost NaN without a word.
        # Raised before the parameters' own list loads (torch loads a module, then its children)
        bad = [key for key in state_dict if key.startswith(prefix + "p.") and isinstance(state_dict[key], torch.Tensor)
               and state_dict[key].is_floating_point() and not bool(torch.isfinite(state_dict[key]).all())]
        if bad:
            raise ValueError(f"{type(self).__name__}.load_state_dict(): {', '.join(repr(key) for key in bad)} "
                             "contains NaN or Inf; nothing of this model was loaded")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # a state dict saved before the mappings were kept has none: the model keeps its own
        key = prefix + "_extra_state"
        if key in missing_keys:
            missing_keys.remove(key)

    def parameter_values(self) -> torch.Tensor:
        """All parameter values ``m_i(p_i)`` as ``(B, P)`` (``B = 1`` when all are shared)."""
        return _stack_values([self.get(i) for i in range(len(self.p))])

    def _transform_parameters(self) -> torch.Tensor:
        self._check_structure("get_matrix()")
        values = self.parameter_values()
        return _select(values, -1, self._slots())

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(cx, cy)`` in pixels."""
        return (self.cx, self.cy)

    # -- matrix and Jacobian ---------------------------------------------------

    def get_matrix(self) -> torch.Tensor:
        """The transform ``A`` (fixed -> moving, pixels), ``(B, 3, 3)``.  Override in a subclass."""
        return self.transform.matrix(self._transform_parameters(), self._center_tensor())

    def get_derva(self, i: int) -> torch.Tensor:
        """``dA/dp_i``, the derivative of :meth:`get_matrix` with respect to the value of parameter ``i``."""
        i = self._check_index(i, "get_derva()")
        return self._transform_jacobian()[:, i]  # not parameter_jacobian(): a subclass's get_derva that
        # hands some parameters to this one (super().get_derva(i)) had recursed without end

    def parameter_jacobian(self) -> torch.Tensor:
        """``dA/dp`` for all parameters, ``(B, P, 3, 3)``.

        Uses the subclass's :meth:`get_derva` when it has one, else the
        transform's Jacobian.  A subclass that overrides :meth:`get_matrix`
        must also override :meth:`get_derva` for the analytic path.
        """
        cls = type(self)
        if cls.get_derva is not TransformModel.get_derva:
            params = self._parameter_list()
            dtype = params[0].dtype if params else None
            derivatives = [_own_result(self.get_derva(i), f"{cls.__name__}.get_derva({i})", "dA/dp_i", self, dtype)
                           for i in range(len(params))]
            shape = derivatives[0].shape if derivatives else None
            if not all(derivative.shape == shape for derivative in derivatives):  # else views of them: one op less
                derivatives = torch.broadcast_tensors(*derivatives)
            return torch.stack(derivatives, dim=-3).reshape(-1, len(params), 3, 3)
        return self._transform_jacobian()

    def _transform_jacobian(self) -> torch.Tensor:
        """``dA/dp`` ``(B, P, 3, 3)`` of the built-in matrix (:meth:`Transform.jacobian`), in the model's
        parameter order; refused where a subclass forms its own matrix and no derivative of it."""
        cls = type(self)
        if cls.get_matrix is not TransformModel.get_matrix and cls.get_derva is TransformModel.get_derva:
            # (base get_derva, reading this since 78ba82f, had returned the built-in matrix's derivative)
            raise NotImplementedError(
                f"{cls.__name__} overrides get_matrix() but not get_derva(i); "
                "the analytic model needs get_derva(i) to return dA/dp_i"
            )
        jacobian = self.transform.jacobian(self._transform_parameters(), self._center_tensor())
        return _select(jacobian, -3, self._jacobian_order())

    def _jacobian_order(self) -> list[int]:
        """For each model parameter, its position among the transform's parameters."""
        slots = self._slots()
        return [slots.index(i) for i in range(len(slots))]

    def _center_tensor(self) -> torch.Tensor:
        reference = self._parameter_list()[0]
        key = (self.cx, self.cy, reference.dtype, reference.device)
        if self._center[0] != key:  # kept: a tensor from floats costs 5 us a step
            # a normal tensor even if made under inference_mode(): kept as an inference tensor, it
            # broke every later autograd step ("Inference tensors cannot be saved for backward")
            with torch.inference_mode(False):
                center = torch.tensor([self.cx, self.cy], dtype=reference.dtype, device=reference.device)
            self._center = (key, center)
        return self._center[1]

    def _parameter_list(self) -> list[nn.Parameter]:
        """``list(self.p)`` from the ParameterList's own dict: ``__getitem__`` costs 1.5 us a parameter."""
        return list(self.p._parameters.values())

    def matrix(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """:meth:`get_matrix` as ``(B, 3, 3)``, expanded to ``batch_size`` pairs if given.

        ``batch_size``: ``None`` or a whole number of at least 1 (``ValueError`` otherwise: ``-1`` and
        ``True`` had given one pair, ``-3`` and ``2.5`` torch's errors from ``expand``)."""
        if batch_size is not None:
            batch_size = positive_whole(batch_size, "batch_size", "matrix()")
        matrix = self.get_matrix()
        if type(self).get_matrix is not TransformModel.get_matrix:  # a subclass's own: say what it returned
            matrix = _own_result(matrix, f"{type(self).__name__}.get_matrix()", "A", self)
        matrix = matrix.reshape(-1, 3, 3)
        if batch_size is not None and matrix.shape[0] != batch_size:
            self._check_batch(matrix.shape[0], batch_size)
            matrix = matrix.expand(batch_size, 3, 3)
        return matrix

    def _overrides(self, names: Sequence[str]) -> bool:
        """Whether this model's class overrides any of :class:`TransformModel`'s methods ``names``."""
        cls = type(self)
        return any(getattr(cls, name) is not getattr(TransformModel, name) for name in names)

    def _has_own_math(self) -> bool:
        """Whether a subclass overrides how values, ``A`` or ``dA/dp`` are formed (``_MODEL_MATH``)."""
        return self._overrides(_MODEL_MATH)

    def _matrix_and_jacobian(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`matrix` ``(B, 3, 3)`` and :meth:`parameter_jacobian` together.

        A ready-made model forms its parameter values once for both
        (:func:`_transform_matrix_and_jacobian`, as the compiled step does): the two public
        methods each form them, twice 12 small operations a step; a subclass's own math is
        called as the seed's users wrote it.
        """
        if self._has_own_math():
            matrix = self._base_similarity_matrix(batch_size)
            return self.matrix(batch_size) if matrix is None else matrix, self.parameter_jacobian()
        values = _stack_values([mapping(raw) for raw, mapping in zip(self._parameter_list(), self.m)])
        matrix, jacobian = _transform_matrix_and_jacobian(
            self.transform, _select(values, -1, self._slots()), self._center_tensor(), self._jacobian_order()
        )
        if matrix.shape[0] != batch_size:
            self._check_batch(matrix.shape[0], batch_size)
            matrix = matrix.expand(batch_size, 3, 3)
        return matrix, jacobian

    def _base_similarity_matrix(self, batch_size: int) -> Optional[torch.Tensor]:
        """:meth:`matrix` of a model whose own math is its ``dA/dp`` alone (``get_derva``,
        ``parameter_jacobian``: the seed's ``MyModelAnalytic``) and whose transform is the base's
        similarity, from the values ``get(i)`` as they are (:func:`~tireg.transforms._similarity_matrix_of_values`:
        the same numbers, bit for bit, in half the operations, without stacking, selecting and checking
        them again each step); ``None`` for any other model, which takes :meth:`matrix`."""
        if self.transform is not _SIMILARITY or self._overrides(_VALUE_MATH + ("get_matrix", "matrix")):
            return None
        slots = self._slots()
        values = [self.get(i) for i in slots]  # (angle, scale, tx, ty)
        first = values[0]
        if not all(value.dtype == first.dtype and value.device == first.device for value in values[1:]):
            return None
        if not all(value.shape == first.shape for value in values[1:]):
            values = torch.broadcast_tensors(*values)
        matrix = _similarity_matrix_of_values(*values, self._center_tensor()).reshape(-1, 3, 3)
        if matrix.shape[0] != batch_size:
            self._check_batch(matrix.shape[0], batch_size)
            matrix = matrix.expand(batch_size, 3, 3)
        return matrix

    def _check_batch(self, sets: int, batch_size: int) -> None:
        if sets not in (1, batch_size):
            raise ValueError(
                f"{type(self).__name__}: the model holds {sets} parameter sets "
                f"but {batch_size} image pairs were given; build the model with batch_size={batch_size}, "
                "or with one shared parameter set (batch_size=1)"
            )

    def extra_repr(self) -> str:
        try:  # a repr says what is wrong rather than raising it
            self._check_structure("repr()")
        except ValueError:
            return f"center=({self.cx:g}, {self.cy:g}), bordermode={self.bordermode!r}, {len(self.p)} parameters, " \
                   f"{len(self.m)} mappings"
        if any(param.is_meta for param in self.p):  # no values to show (reading them raised)
            return f"center=({self.cx:g}, {self.cy:g}), bordermode={self.bordermode!r}, values on 'meta'"
        values = ", ".join(f"{v:.4g}" for v in self.parameter_values()[0].tolist())
        return f"center=({self.cx:g}, {self.cy:g}), bordermode={self.bordermode!r}, values[0]=({values})"


class AffineModel(TransformModel):
    """Autograd model: ``forward(source)`` returns the moving image warped by ``A``.

    Example (the seed's loop)::

        warped = model(moving)
        loss = loss_func(warped, fixed).sum()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def forward(self, source: torch.Tensor, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``warped(x) = M(A x)`` on a grid of ``size = (H, W)`` (default: the source's), ``(B, C, H, W)``."""
        caller = f"{type(self).__name__}.forward()"
        if isinstance(size, torch.Tensor) and size.dim() > 1:  # the analytic model's forward(source, target)
            raise ValueError(f"{caller}: 'size' must be (H, W); got a tensor of shape {tuple(size.shape)}: the "
                             "autograd model takes forward(source) and returns the warped image (the fixed image "
                             "goes into your loss)")
        self._check_structure(caller)
        source = self._finite.check(source, "source", caller)
        if len(self.p):  # named as the analytic model names it (warp() named a 'matrix' the user never passed)
            _check_like(self.p[0], source, caller)
        matrix = self.matrix(source.shape[0])
        # no check of the last row (a read of values, a wait per step on a GPU): the model's matrix is affine
        return checked_warp(source, matrix, size, self.interpolation, self.bordermode, caller, affine=False)


class AffineModelAnalytic(TransformModel):
    """Analytic model: ``forward(source, target)`` returns ``(warped, loss)`` and writes ``param.grad``.

    The gradient is the seed's chain rule ``C'(F, M(Ax)) * grad M(Ax) * dA/dp * m'(r)``
    as one reduction over the pixels (:mod:`tireg.analytic`).  Gradients are
    *accumulated* into ``param.grad`` as ``backward()`` would; call
    ``optimizer.zero_grad()`` between steps.  As with ``backward()``, nothing
    is written under ``torch.no_grad()`` or ``torch.inference_mode()``, nor
    into a parameter that does not require grad, and each ``.grad`` is laid
    out like its parameter (fused optimisers read it so).  Unlike
    ``backward()``, no autograd graph is involved: the outputs are detached,
    and hooks on the parameters (``register_hook``, post-accumulate hooks,
    and so ``DistributedDataParallel``'s gradient reduction) do not run;
    change ``param.grad`` after ``forward`` instead, or use the autograd model.

    Args:
        cx, cy, bordermode, interpolation, batch_size: as :class:`TransformModel`.
        moving: the moving image ``(B, C, H, W)`` (the seed's ``movingImage``).
        image_gradient: ``"exact"`` (default): the derivative of the
            interpolated image, equal to autograd's gradient; ``"central"``
            or ``"gaussian"``: gradient images precomputed once from
            ``moving`` (central differences, or derivative of Gaussian of
            ``sigma`` pixels) and sampled at the warped points: an approximation.
            Or a function of the moving image ``(B, C, H, W)`` returning its
            gradient images ``(B, C, 2, H, W)`` (``d/dx`` then ``d/dy``, per
            pixel), the seed's "custom method, e.g., difference of Gaussian",
            sampled the same way (a module-level function, so that the model
            pickles).  They are made again when ``forward`` gets another tensor or one
            changed in place (its version counter), or after ``bordermode``,
            ``image_gradient`` or ``sigma`` changed; a write that bypasses
            the counter (through a NumPy view of the tensor, or ``.data``)
            is not seen, nor by the NaN check: pass a new tensor, or a
            ``torch.from_numpy`` made after the write.
        sigma: standard deviation for ``image_gradient="gaussian"``.  Both
            ``image_gradient`` and ``sigma`` are also settable as attributes,
            checked when set as in the constructor.
        loss_func: per-pixel loss (default :class:`~tireg.losses.L2Loss`);
            also settable as the attribute ``loss_func``.  The cost is its
            plain sum over pixels and channels, as in the seed.
        metric: instead of ``loss_func``, any :mod:`tireg.metrics` metric
            (``"ncc"``, ``"lncc"``, ``"mi"``, ``"nmi"``, or an instance); the
            cost is then the metric's, summed over the pairs.  Also settable as
            the attribute ``metric``.  A histogram metric (``"mi"``, ``"nmi"``)
            runs as a copy the model keeps (the metric itself is never changed,
            and may be shared by models and threads): with its ranges where
            they were set (``set_ranges``), else with the whole source's and
            target's ranges, as ``register()`` gives them: ranges of each warped
            image would change with the transform, and the gradient would not
            be the derivative of the cost (3 % off on a test).
        compile: ``True``: compute each step with the compiled fused kernel
            (:mod:`tireg.fused`: one pass over the pixels for the warped
            image, cost and gradient; the same numbers as the reference
            path).  ``"auto"`` (default): the reference path until this
            model's eager steps have taken :data:`AUTO_COMPILE_SECONDS` in
            all, then the compiled one (a short loop never pays for a
            compile).  ``False``: never.  It applies to bilinear
            interpolation, ``"zeros"`` or ``"border"`` padding, a per-pixel
            loss and ``image_gradient="exact"``; other settings use the
            reference path.  A ready-made model with built-in mappings
            compiles its whole step (values, matrix, Jacobian, kernel,
            gradients) into one graph; a subclass's own
            ``get_matrix``/``get_derva`` runs eagerly around the kernel.  The
            first compiled step compiles (seconds); it pays in long loops and
            large images (``benchmarks/speed.py``).  Also settable as the
            attribute (setting it starts the ``"auto"`` clock again).
    """

    def __init__(
        self,
        cx: float,
        cy: float,
        bordermode: str,
        moving: torch.Tensor,
        *,
        interpolation: str = "bilinear",
        image_gradient: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "exact",
        sigma: float = 1.0,
        loss_func: Union[str, PerPixelLoss, None] = None,
        metric: Union[str, Metric, None] = None,
        batch_size: int = 1,
        compile: Union[bool, str] = "auto",
    ):
        super().__init__(cx, cy, bordermode, interpolation=interpolation, batch_size=batch_size)
        caller = f"{type(self).__name__}()"
        check_image(moving, "moving", caller)
        self.image_gradient = image_gradient  # checked by the properties
        self.sigma = sigma
        self.loss_func = loss_func  # by name or None (L2): __setattr__ makes and checks it
        if metric is not None and type(self.loss_func) is not L2Loss:  # the metric replaces the loss
            raise ValueError(f"{caller}: give a loss or a metric, not both (the metric replaces the loss); "
                             f"got loss {loss_func!r} and metric {metric!r}")
        self.metric: Optional[Metric] = metric
        # the source moving_with_gradient was made from, with the settings it was made with
        self._moving_stamp: Optional[TensorStamp] = None
        # the model's own dA/dp checked against autograd's (_check_own_jacobian): (key, what it keeps alive,
        # the indices of the parameters that get_matrix() does not use)
        self._jacobian_checked: tuple = (None, None, frozenset())
        # the mappings of one's own checked (_check_own_mappings): (key, what it keeps alive)
        self._mappings_checked: tuple = (None, None)
        self.register_buffer("moving_with_gradient", None, persistent=False)
        self._pixel_axes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compile = compile
        self._padded: tuple[Optional[TensorStamp], Optional[torch.Tensor]] = (None, None)
        self._coordinates: tuple[Optional[tuple], Optional[tuple[torch.Tensor, torch.Tensor]]] = (None, None)
        # (stamps of the images, the metric, its copy with their ranges): see _metric_for
        self._ranges: tuple[tuple, Optional[Metric], Optional[Metric]] = ((None, None), None, None)
        if self.image_gradient != "exact":
            self._precompute(moving)

    image_gradient = _Checked(lambda value, caller: value if callable(value) else check_option(
        value, IMAGE_GRADIENTS, "image gradient", caller), '``"exact"``, ``"central"``, ``"gaussian"`` or a function.')
    sigma = _Checked(_positive_sigma, 'Standard deviation in pixels for ``image_gradient="gaussian"``.')

    def __setattr__(self, name: str, value) -> None:
        # a loss or metric by name (None: L2, no metric), checked whenever set, the constructor's too
        # (model.loss_func = "cauchy" raised torch's "cannot assign 'str' as child module";
        # model.metric = 3 waited for the next forward)
        made = _BY_NAME.get(name)
        if made is not None:
            value = made(value, f"{type(self).__name__}.{name}")
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        """A copy (pickle, ``torch.save``, ``deepcopy``, a process pool) leaves out what was derived
        from the images passed so far (the padded moving image, the coordinate grids, the sampled
        gradient images): the copy makes them again on its first forward."""
        state = super().__getstate__()
        state.update(_padded=(None, None), _coordinates=(None, None), _pixel_axes={}, _moving_stamp=None,
                     _jacobian_checked=(None, None, frozenset()), _mappings_checked=(None, None),
                     _ranges=((None, None), None, None), _buffers=dict(state["_buffers"], moving_with_gradient=None))
        return state

    def _metric_for(self, source: torch.Tensor, target: torch.Tensor) -> Metric:
        """The metric; a histogram metric as a copy the model keeps: with the user's ranges where they
        set them, else with the whole images' ranges (made again when either image changes).  The
        metric itself is never changed: ranges set on it went stale for the next images, a copy of the
        model or another model sharing it (a cost of -1e-5 and zero gradients); and the fixed image's
        bins it keeps made a metric shared by two models in two threads give each the other's bins."""
        metric = get_metric(self.metric)
        if not hasattr(metric, "set_ranges"):  # per pixel: no state
            return metric
        (source_stamp, target_stamp), original, ranged = self._ranges
        if metric.ranges is not None:  # the user's ranges, as they are now
            if original is not metric or ranged is None or ranged.ranges is not metric.ranges:
                ranged = copy.copy(metric)
                self._ranges = ((None, None), metric, ranged)
            return ranged
        if original is not metric or not (matches(source_stamp, source) and matches(target_stamp, target)):
            ranged = copy.copy(metric)
            ranged.set_ranges(source, target)
            self._ranges = ((TensorStamp(source), TensorStamp(target)), metric, ranged)
        return ranged

    def _precompute(self, moving: torch.Tensor) -> None:
        """Stack ``[M, dM/dx, dM/dy]`` once, so that one ``grid_sample`` samples all three."""
        if callable(self.image_gradient):  # the user's own: checked, as it goes into every step
            with torch.no_grad():
                gradient = self.image_gradient(moving)
            expected = (*moving.shape[:2], 2, *moving.shape[2:])
            if (not isinstance(gradient, torch.Tensor) or tuple(gradient.shape) != expected
                    or gradient.device != moving.device):
                got = (f"{tuple(gradient.shape)} on {gradient.device}" if isinstance(gradient, torch.Tensor)
                       else type(gradient).__name__)
                raise ValueError(f"{type(self).__name__}: the image_gradient function must return the moving "
                                 f"image's gradient images (B, C, 2, H, W) = {expected} on {moving.device}; "
                                 f"got {got}")
            gradient = check_image(gradient.flatten(1, 2), "the image_gradient function's result",
                                   type(self).__name__).to(moving.dtype).view(expected)
        else:
            gradient = compute_image_gradient(
                moving, method=self.image_gradient, sigma=self.sigma, padding_mode=self.bordermode
            )
        # unchecked: moving is a checked image, gradient its (B, C, 2, H, W) made or checked above
        self.moving_with_gradient = _stack_with_gradient(moving, gradient)
        self._moving_stamp = TensorStamp(moving, *self._gradient_settings())

    def _gradient_settings(self) -> tuple:
        """The settings the gradient images depend on, part of their key: ``bordermode`` (their
        padding), ``image_gradient`` and ``sigma``.  One changed after construction had left them
        as they were, and a model set to ``"border"`` sampled gradients made with zero padding."""
        return (self.bordermode, self.image_gradient, self.sigma)

    def _padded_moving(self, source: torch.Tensor) -> torch.Tensor:
        """The source prepared for the fused kernel (:func:`tireg.fused.prepare_moving`), kept while
        the same tensor is passed."""
        if not matches(self._padded[0], source, self.bordermode):
            self._padded = (TensorStamp(source, self.bordermode), prepare_moving(source, self.bordermode))
        return self._padded[1]

    def _coordinate_grids(self, target: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`tireg.fused.coordinate_grids` of the target's grid, kept while its size stays: of its
        first :func:`tireg.fused.step_band_rows` rows, where the step runs in bands (an image
        beyond one band, :func:`tireg.fused.step_in_bands`), else all of them."""
        key = (tuple(target.shape[-2:]), target.dtype, target.device)
        if self._coordinates[0] != key:
            rows = fused.step_band_rows(*target.shape[-2:])  # one band's: the step runs in bands
            self._coordinates = (key, fused.coordinate_grids(target[..., :rows, :]))
        return self._coordinates[1]

    @property
    def compile(self) -> Union[bool, str]:
        """``True``, ``False`` or ``"auto"`` (see the class)."""
        return self._compile

    @compile.setter
    def compile(self, value: Union[bool, str]) -> None:
        self._compile = check_compile_option(value, f"{type(self).__name__}()")
        self._eager_seconds = 0.0  # the "auto" clock

    def _compile_now(self) -> bool:
        """Whether this step may take the compiled path: ``compile=True``, or ``"auto"`` once due."""
        if self._compile == "auto":
            return self._eager_seconds >= AUTO_COMPILE_SECONDS
        return self._compile

    def _fused_kernel_applies(self, channels: int = 1) -> bool:
        """Whether the compiled fused kernel computes this model's step."""
        return (
            self._compile_now() and self.metric is None and self.image_gradient == "exact"
            and supports(self.interpolation, self.bordermode, self.loss_func,
                         self.p[0].dtype if len(self.p) else torch.float32, channels)
        )

    def _axes(self, size: Sequence[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(size), like.dtype, like.device)
        if key not in self._pixel_axes:
            self._pixel_axes = {key: _pixel_axes(key[0], like.dtype, like.device)}  # a checked image's (H, W)
        return self._pixel_axes[key]

    @without_autocast  # the gradient's sums in the images' dtype, as backward() keeps .grad's
    def forward(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``source`` onto ``target``'s grid, return ``(warped, sum of per-pixel loss)``, write gradients."""
        caller = f"{type(self).__name__}.forward()"
        if torch._C._functorch.maybe_current_level() is not None:  # raised deep inside, or gave zero gradients
            raise RuntimeError(f"{caller}: torch.func transforms (grad, vmap, jacrev, ...) cannot run an analytic "
                               "model: it writes param.grad in forward and its outputs hold no graph; use the "
                               "autograd model (create_model(..., gradients='autograd'))")
        self._check_structure(caller)
        source = self._finite.check(source, "source", caller)
        target = self._finite.check(target, "target", caller)
        if source.shape[:2] != target.shape[:2]:
            raise ValueError(
                f"{caller}: 'source' and 'target' must have the same batch size and channels; "
                f"got {tuple(source.shape)} and {tuple(target.shape)}"
            )
        if source.dtype != target.dtype:
            raise ValueError(f"{caller}: 'source' is {source.dtype} but 'target' is {target.dtype}")
        # as backward() would: nothing accumulates under no_grad() or inference_mode() (a validation
        # forward between a step's forward and optimizer.step() doubled its gradient)
        write_gradients = torch.is_grad_enabled()
        stacked = None
        if self.image_gradient != "exact":
            if not matches(self._moving_stamp, source, *self._gradient_settings()):
                self._precompute(source)
            stacked = self.moving_with_gradient
        self._check_own_mappings(caller)
        unused = self._check_own_jacobian(caller)
        batch = source.shape[0]
        with torch.no_grad():
            # the one-graph step, but for an image beyond one band (fused.step_in_bands): its kernel
            # then runs in bands, around the eager chain rule below, with one band's coordinates kept
            if stacked is None and self._compiled_step_applies(source.shape[1]) and not fused.step_in_bands(target):
                result = self._compiled_step(source, target, caller, write_gradients)
                if result is not None:
                    return result
            timed = self._compile == "auto" and not self._compile_now()
            started = time.perf_counter() if timed else 0.0
            kernel = stacked is None and self._fused_kernel_applies(source.shape[1])
            with self._step_values():
                matrix, jacobian = self._matrix_and_jacobian(batch)
            _check_like(matrix, source, caller)
            # unchecked (no read of the matrix's last row, a wait per step on a GPU): built here, affine
            warped, cost, matrix_gradient = _cost_and_gradient(
                target,
                source,
                matrix,
                self.loss_func if self.metric is None else self._metric_for(source, target),
                interpolation=self.interpolation,
                padding_mode=self.bordermode,
                moving_with_gradient=stacked,
                axes=self._axes(target.shape[-2:], matrix),
                compile=self._compile_now(),
                padded_moving=self._padded_moving(source) if kernel else None,
                coordinates=self._coordinate_grids(target) if kernel else None,
            )
            gradient = parameter_gradient(matrix_gradient, jacobian)  # (B, P): dL/dp
            params = self._parameter_list()
            if write_gradients:  # chain rule through m(r), or through a subclass's own values
                raw_gradients = (self._through_own_values(gradient, params) if self._has_own_values()
                                 else _raw_gradients(gradient, params, self.m))
                for i in unused:  # as backward() leaves them: no .grad where A does not depend on the parameter
                    raw_gradients[i] = None
                _accumulate(params, raw_gradients)
            if timed:
                self._eager_seconds += time.perf_counter() - started
        return warped, cost.sum()

    def _check_own_mappings(self, caller: str) -> None:
        """Check every mapping of one's own (any :class:`~tireg.mappings.Mapping` but tireg's three as
        they are; a subclass of one that overrides ``forward`` or ``derivative`` too) that the chain
        rule uses: ``derivative(r)`` against a central difference of its ``forward`` in float64, at
        the current raw values and a few tenths from them.

        The analytic gradient is ``dL/dp * m'(r)``: a ``derivative`` that is not ``forward``'s put its
        error into every gradient, silently on a ready-made model (a rigid model's shift 10.2 for
        autograd's 30.5), and on a subclass that overrides ``get_derva`` the error named
        ``get_derva``.  Checked at the first forward and when the mappings or parameters change;
        within 1e-3 of the larger derivative (plus 1e-9), where the one-sided differences agree (a
        kink is not checked).  Not where a subclass forms its values its own way (``get``), which
        the chain rule follows by autograd."""
        params = self._parameter_list()
        key = (tuple(map(id, self.m)), tuple(map(id, params)))
        if self._mappings_checked[0] == key:
            return
        if not self._has_own_values():
            for i, (mapping, param) in enumerate(zip(self.m, params)):
                if (type(mapping).forward, type(mapping).derivative) in _EXACT_DERIVATIVES:
                    continue
                for offset in (0.0, _CHECK_OFFSETS[0]):
                    raw = param.detach().to(torch.float64) + offset
                    relative = _derivative_error(mapping, raw)
                    if relative is not None and relative > 1e-3:
                        raise ValueError(
                            f"{caller}: {type(mapping).__name__}.derivative() of parameter {i} is not the derivative "
                            f"of its forward(): a central difference of forward() differs from it by {relative:.1%} "
                            f"at raw value {float(raw.flatten()[0]):.6g}; the analytic gradient, dL/dp * m'(r), would "
                            "be that of another function than the cost. derivative(r) must return d forward(r) / dr.")
        self._mappings_checked = (key, (params, list(self.m)))

    def _check_own_jacobian(self, caller: str) -> frozenset:
        """Check a subclass's own ``dA/dp`` (``get_derva``, ``parameter_jacobian``) against autograd's
        derivative of its matrix; return the indices of the parameters the matrix does not depend on.

        The analytic gradient is ``<G, get_derva(i)>``; it is the gradient of the cost only where
        ``get_derva(i)`` is the derivative of the matrix the model warps with.  A subclass that copied
        the seed's analytic model (``get_derva`` only) with its parameters in its own order, say
        ``(angle, scale, dx, dy)``, warped with the base's matrix, whose order is
        ``(angle, dx, dy, scale)`` (``transform_slots``), while differentiating its own: the loss and
        the gradient belonged to two functions, gradients 4-450 % off, and nothing said so.

        Checked at the first forward, and again when the parameters (the objects, ``requires_grad``,
        dtype, device) or the mappings change: in raw terms, ``dA/dr`` as the analytic path forms it
        (``get_derva(i) m_i'(r_i)``, or through a subclass's own values by autograd) against
        autograd's through :meth:`matrix`, for the six entries of A's top rows and every parameter
        that requires grad, with the pairs' matrices as the step uses them.  Per ``nn.Parameter``: one
        that fills several slots of ``self.p`` (scale x and y tied) is compared as the sum of its
        slots' derivatives, the gradient its ``.grad`` gets.  A parameter passes where every difference
        is within 1e-3 of its largest entry (plus 1e-6 of the largest of all, for a parameter whose
        derivative is all but zero): float32 rounding is far below that, and an order mixed up or a
        derivative of another function far above.

        At two points: the current values, and the raw values shifted by a few tenths
        (``_CHECK_OFFSETS``, on temporaries swapped in for the check; the parameters and any optimiser
        state are not touched): the first forward usually comes at the identity start (angle 0,
        scale 1), where a ``get_derva`` that leaves out the scale or a sine term is right, and it
        gave wrong gradients once the scale moved.  A second point that a subclass's own math cannot
        take (it raises, or its matrix is not finite there) is left out.

        Where autograd cannot follow the matrix to a parameter (built with a Python number,
        ``float(self.get(3))``; the analytic path never needs a differentiable matrix) but its
        ``get_derva`` is not zero, the comparison is with a central difference of the matrix in
        float64, where the two one-sided differences agree (else that parameter is not checked).
        Skipped under inference mode; a parameter frozen or beyond the check's reach (every one
        frozen) is checked when it next requires grad.

        A parameter that ``get_matrix()`` does not use at all (autograd has no gradient for it) and
        whose ``get_derva`` is zero gets no ``.grad``, as ``backward()`` leaves it (a zero ``.grad``
        had let AdamW's weight decay move it).
        """
        if not self._overrides(("get_derva", "parameter_jacobian")):
            return frozenset()
        params = self._parameter_list()
        reference = params[0] if params else None
        key = (tuple(map(id, params)), tuple(param.requires_grad for param in params), tuple(map(id, self.m)),
               None if reference is None else (reference.dtype, reference.device))
        checked, _, unused = self._jacobian_checked
        if checked == key:
            return unused
        if not any(param.requires_grad for param in params) or torch.is_inference_mode_enabled():
            return frozenset()
        groups: dict[int, list[int]] = {}  # one nn.Parameter's slots in self.p
        for i, param in enumerate(params):
            if param.requires_grad:
                groups.setdefault(id(param), []).append(i)
        slots = list(groups.values())
        unused = self._compare_own_jacobian(caller, params, slots, {})
        shifted = {id(params[group[0]]): (params[group[0]].detach() + _CHECK_OFFSETS[k % len(_CHECK_OFFSETS)])
                   .requires_grad_() for k, group in enumerate(slots)}
        self._compare_own_jacobian(caller, params, slots, shifted)
        unused = frozenset(i for group in unused for i in group)
        self._jacobian_checked = (key, (params, list(self.m)), unused)
        return unused

    def _compare_own_jacobian(self, caller: str, params: list, slots: list, point: dict) -> list:
        """:meth:`_check_own_jacobian` at one point: ``point`` maps ``id(param)`` to the leaf tensor
        that stands for it there (``{}``: the current values).  Raise on a mismatch; return the slot
        groups the matrix does not use."""
        try:
            with self._parameters_swapped(point):
                entries = self._jacobian_entries(params, slots, point)
        except Exception:
            if not point:
                raise
            return []  # a second point the subclass's math cannot take
        if entries is None:
            return []
        automatic, analytic, connected = entries
        if point and not all(bool(torch.isfinite(a).all() and torch.isfinite(b).all())
                             for a, b in zip(automatic, analytic)):
            return []
        scales = [max(float(a.abs().max()), float(b.abs().max())) for a, b in zip(automatic, analytic)]
        largest = max(scales, default=0.0)
        unused = []
        for group, mine, theirs, linked, scale in zip(slots, analytic, automatic, connected, scales):
            if not linked:
                if scale == 0.0:
                    unused.append(group)
                    continue
                # autograd cannot follow the matrix to this parameter: a float64 difference of it
                theirs = self._matrix_difference(params, group, point)
                if theirs is None:
                    continue
                scale = max(scale, float(theirs.abs().max()))
                largest = max(largest, scale)
            difference = float((theirs - mine).abs().max())
            if difference > 1e-3 * scale + 1e-6 * largest:
                raise ValueError(self._jacobian_mismatch(caller, group, linked, difference / scale,
                                                         float(theirs.abs().max()) == 0.0, bool(point)))
        return unused

    @contextlib.contextmanager
    def _parameters_swapped(self, point: dict):
        """Within it, every registration of a parameter ``id`` in ``point`` (in ``self.p`` or elsewhere
        in the module, a tied one in each of its places) holds ``point[id]``; restored after."""
        swapped = []
        try:
            if point:
                for module in self.modules():
                    for name, param in list(module._parameters.items()):
                        if param is not None and id(param) in point:
                            module._parameters[name] = point[id(param)]
                            swapped.append((module, name, param))
            yield
        finally:
            for module, name, param in reversed(swapped):
                module._parameters[name] = param

    def _jacobian_entries(self, params: list, slots: list, point: dict):
        """For each slot group, ``(autograd's dA/dr, the analytic path's)`` of A's six top-row entries,
        ``(6, *shape)`` each, and whether autograd reached it; ``None`` where the analytic model could
        not say (its values form no graph)."""
        tensors = [point.get(id(param), param) for param in params]
        wanted = [tensors[group[0]] for group in slots]
        with torch.enable_grad():  # all of it: a first forward may come under no_grad() (a validation step)
            matrix = self.matrix()
            jacobian = self.parameter_jacobian().detach()
            own_values = self._has_own_values()
            values = _stack_values([self.get(i) for i in range(len(tensors))]) if own_values else None
            pairs = max(matrix.shape[0], jacobian.shape[0])
            matrix, jacobian = matrix.expand(pairs, 3, 3), jacobian.expand(pairs, -1, -1, -1)
            derivatives = (None if own_values else
                           [[self.m[i].derivative(tensors[i].detach()).reshape(-1) for i in group] for group in slots])
            automatic = [[] for _ in slots]
            analytic = [[] for _ in slots]
            connected = [False] * len(slots)
            for row, column in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)):
                found = (torch.autograd.grad(matrix[:, row, column].sum(), wanted, retain_graph=True,
                                             allow_unused=True)
                         if matrix.requires_grad else [None] * len(wanted))
                if own_values:
                    linear = (values.expand(pairs, -1) * jacobian[..., row, column]).sum()
                    formed = (torch.autograd.grad(linear, wanted, retain_graph=True, allow_unused=True)
                              if linear.requires_grad else [None] * len(wanted))
                else:  # a parameter in several slots: the sum of theirs, the gradient its .grad gets
                    formed = [sum((jacobian[:, i, row, column] * derivative).sum_to_size(tensor.shape)
                                  for i, derivative in zip(group, group_derivatives))
                              for group, group_derivatives, tensor in zip(slots, derivatives, wanted)]
                for k, (mine, theirs, tensor) in enumerate(zip(formed, found, wanted)):
                    connected[k] = connected[k] or theirs is not None
                    automatic[k].append(torch.zeros_like(tensor) if theirs is None else theirs.detach())
                    analytic[k].append(torch.zeros_like(tensor) if mine is None else mine.detach())
        return [torch.stack(entries) for entries in automatic], [torch.stack(entries) for entries in analytic], connected

    def _matrix_difference(self, params: list, group: list, point: dict) -> Optional[torch.Tensor]:
        """``dA/dr`` of the parameter in slots ``group`` (A's six top-row entries, ``(6, *shape)``) by a
        central difference of :meth:`matrix` in float64, on temporaries; ``None`` where it is not clean
        (the one-sided differences disagree: float32 inside, a kink) or the matrix cannot be formed so."""
        base = {}
        for param in params:
            base.setdefault(id(param), point.get(id(param), param).detach().to(torch.float64))
        target = id(params[group[0]])
        raw = base[target]
        step = 1e-6 * max(1.0, float(raw.abs().max()))

        def entries(offset: float) -> torch.Tensor:
            with self._parameters_swapped({**base, target: raw + offset}), torch.no_grad():
                matrix = self.matrix()
            if matrix.dtype != torch.float64:
                raise TypeError
            return matrix[:, :2, :].reshape(matrix.shape[0], 6).t()  # (6, pairs)

        try:
            middle, up, down = entries(0.0), entries(step), entries(-step)
        except Exception:
            return None
        forward, backward, central = (up - middle) / step, (middle - down) / step, (up - down) / (2 * step)
        scale = float(central.abs().max())
        if not bool(torch.isfinite(central).all()) or float((forward - backward).abs().max()) > 1e-4 * scale + 1e-9:
            return None
        return central.sum_to_size(6, *raw.shape).to(params[group[0]].dtype)

    def _jacobian_mismatch(self, caller: str, group: Sequence[int], connected: bool, relative: float,
                           zero: bool = False, shifted: bool = False) -> str:
        """The message for a subclass's ``get_derva(i)`` that is not the derivative of its matrix."""
        name = type(self).__name__
        own = "get_derva" if self._overrides(("get_derva",)) else "parameter_jacobian"
        whats = [f"get_derva({i})" if own == "get_derva" else f"parameter_jacobian()[:, {i}]" for i in group]
        what = " + ".join(whats)
        i = group[0]
        parameter = (f"parameter {i}" if len(group) == 1 else
                     f"the parameter in slots {', '.join(map(str, group))} of self.p (one nn.Parameter: the sum "
                     "of its slots' derivatives is its gradient)")
        where = ("at raw values a few tenths from the current ones (it agrees at the current values, where "
                 "terms such as sin(angle) or scale - 1 may vanish)" if shifted else "at the current values")
        if not connected and zero:
            found = f"get_matrix() does not depend on {parameter}, but {what} is not zero {where}"
        else:
            how = "autograd's" if connected else "a float64 finite difference of get_matrix()'s"
            found = (f"{what} is not the derivative of get_matrix() with respect to {parameter}: {how} differs "
                     f"from it by {relative:.1%} of its largest entry {where}")
        if self._overrides(("get_matrix",)):
            advice = f"Check {what} against get_matrix()."
        else:
            advice = (f"{name} overrides {own} but not get_matrix(), so it warps with the base class's matrix: the "
                      f"{self.transform.name!r} transform with the parameters in the order {self._model_order()} "
                      "(transform_slots). Override get_matrix() to build A from your parameters in your order "
                      "(as the seed's MyModel does), or order your parameters as the base does; if they are in "
                      f"that order, check {what} against that matrix.")
        return (f"{caller}: {found}; the analytic gradient would be that of another function than the cost. "
                f"{own}(i) must return dA/dp_i, the derivative of the matrix get_matrix() builds with respect to "
                f"parameter i (self.get(i)). {advice}")

    def _has_own_values(self) -> bool:
        """Whether a subclass forms the parameter values its own way (``_VALUE_MATH``), not as ``m_i(p_i)``."""
        return self._overrides(_VALUE_MATH)

    def _through_own_values(self, gradient: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``dL/dr`` from ``gradient`` ``(B, P)`` by autograd through the subclass's own values, the vector-
        Jacobian product ``gradient . dv/dr`` of a few scalar operations.

        ``gradient`` is ``dL/dv`` for ``v_i = get(i)`` where ``dA/dp`` is the subclass's own
        (``get_derva``, ``parameter_jacobian``), else for the transform's parameters
        (``_transform_parameters``, the values in the transform's order).  The chain rule through
        ``m_i'(r_i)`` assumed ``get(i) = m_i(p_i)``: a ``get`` that stored an angle in degrees had its
        gradient 180 / pi times autograd's.
        """
        with torch.enable_grad():
            if self._overrides(("get_matrix", "get_derva", "parameter_jacobian")):
                values, outputs = _stack_values([self.get(i) for i in range(len(params))]), gradient
            else:
                values, outputs = self._transform_parameters(), _select(gradient, -1, self._slots())
            if values.shape[0] != outputs.shape[0]:  # every value shared by the pairs
                outputs = outputs.sum(0, keepdim=True)
            wanted = [param for param in params if param.requires_grad]
            found = iter(torch.autograd.grad(values, wanted, outputs.to(values.dtype), allow_unused=True)
                         if values.requires_grad and wanted else [None] * len(wanted))
        return [next(found) if param.requires_grad else None for param in params]

    def _compiled_step_applies(self, channels: int = 1) -> bool:
        """Whether one compiled graph can take the whole step (:func:`_fused_step`).

        It can for a ready-made model (the transform's own matrix and
        Jacobian) with built-in mappings, where the fused kernel applies; a
        subclass's own ``get_matrix``/``get_derva``, or a mapping of its own,
        runs eagerly around the compiled kernel instead.
        """
        return (
            not self._has_own_math()
            and all(type(mapping) in _BUILT_IN_MAPPINGS for mapping in self.m)
            and self._fused_kernel_applies(channels)
        )

    def _compiled_step(self, source: torch.Tensor, target: torch.Tensor, caller: str, write_gradients: bool):
        """The step by the compiled :func:`_fused_step`, or ``None`` where it cannot compile."""
        params = self._parameter_list()
        _check_like(params[0], source, caller)
        self._check_batch(max(param.shape[0] for param in params), source.shape[0])
        padded = self._padded_moving(source)
        step = fused.compiled(_fused_step, source.device, small=fused.fits_32_bit(target, padded),
                              dynamic=fused.dynamic_shapes(target))
        result = fused.call_compiled(
            step, source.device, params, list(self.m), self.transform, self._slots(), self._jacobian_order(),
            self._center_tensor(), target, padded, self.loss_func, self.bordermode, self._coordinate_grids(target),
        )
        if result is None:
            return None
        warped, cost, raw_gradients = result
        if write_gradients:
            _accumulate(params, raw_gradients)
        return warped, cost


#: An analytic model's settings taken by name (:meth:`AffineModelAnalytic.__setattr__`).
_BY_NAME: dict[str, Callable] = {
    "loss_func": lambda value, caller: L2Loss() if value is None else get_loss(value, caller),
    "metric": lambda value, caller: None if value is None else get_metric(value, caller),
}


def _own_result(value, where: str, what: str, model: "TransformModel", dtype: Optional[torch.dtype] = None
                ) -> torch.Tensor:
    """What a subclass's ``get_matrix``/``get_derva`` returned, checked: a float tensor of
    ``(3, 3)`` or ``(B, 3, 3)`` matrices in the parameters' dtype (a mistake there otherwise
    surfaced as a reshape, expand or dtype error deep inside).  ``dtype``: the parameters', where
    the caller has it (looking it up in ``model.p`` costs microseconds)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must return {what} as a torch.Tensor of shape (B, 3, 3) or (3, 3); "
                        f"got {type(value).__name__}")
    if value.dim() not in (2, 3) or value.shape[-2:] != (3, 3):
        raise ValueError(f"{where} must return {what} of shape (B, 3, 3) or (3, 3) (homogeneous, last row "
                         f"(0, 0, 1) for A, 0 for a derivative); got {tuple(value.shape)}")
    if dtype is None:
        dtype = model.p[0].dtype if len(model.p) else value.dtype
    if value.dtype != dtype:
        raise ValueError(f"{where} returned {value.dtype}, but the model's parameters are {dtype}; "
                         "build it from the parameters (self.get(i)) so that it follows .to()")
    return value


def _check_like(model_tensor: torch.Tensor, source: torch.Tensor, caller: str) -> None:
    """The model's parameters (or its matrix) must have the images' dtype and device."""
    if model_tensor.dtype != source.dtype or model_tensor.device != source.device:
        raise ValueError(
            f"{caller}: the model's parameters are {model_tensor.dtype} on {model_tensor.device} but the images are "
            f"{source.dtype} on {source.device}; move the model with .to()"
        )


def _accumulate(params: Sequence[torch.Tensor], raw_gradients: Sequence[torch.Tensor]) -> None:
    """Add ``dL/dr`` into every ``param.grad``, as ``backward()`` would: not into a parameter that
    does not require grad (a frozen one; an optimiser updates any parameter that has a ``.grad``).

    Every ``raw_gradient`` is new (:func:`_raw_gradients` computes them; some are views of one
    new tensor, each its own elements), so a first gradient is taken as it is, without a copy.
    """
    for param, raw_gradient in zip(params, raw_gradients):
        if not param.requires_grad or raw_gradient is None:  # frozen, or not among the values
            continue
        if param.grad is None:
            param.grad = raw_gradient
        else:
            param.grad += raw_gradient


#: Methods that define a model's matrix and Jacobian; a subclass that overrides one has its own math.
_MODEL_MATH = ("get", "get_matrix", "get_derva", "parameter_jacobian", "parameter_values", "_transform_parameters")
#: ... and those of them that form the parameter values (the analytic gradient then goes through
#: them by autograd, :meth:`AffineModelAnalytic._through_own_values`).
_VALUE_MATH = ("get", "parameter_values", "_transform_parameters")
_BUILT_IN_MAPPINGS = (IdentityMapping, SigmoidMapping, ExpMapping)
_SIMILARITY = TRANSFORMS["similarity"]
#: What the get_derva check adds to each raw value (per nn.Parameter, in turn) for its second point, a
#: point away from the identity start where sine terms and scale factors vanish.
_CHECK_OFFSETS = (0.173, -0.219, 0.251, -0.137, 0.193, -0.241, 0.157, -0.283)
#: tireg's own mappings' (forward, derivative), exact by construction: not checked
#: (:meth:`_check_own_mappings`; a subclass that overrides either one is).
_EXACT_DERIVATIVES = tuple((mapping.forward, mapping.derivative) for mapping in _BUILT_IN_MAPPINGS)


def _derivative_error(mapping: Mapping, raw: torch.Tensor) -> Optional[float]:
    """``max |derivative(r) - D(r)| / max(|derivative|, |D|)`` over ``raw`` (float64), with ``D`` the
    central difference of ``mapping.forward`` where that is clean
    (:func:`~tireg._validation.checked_derivative`); ``None`` where it cannot say."""
    pairs = checked_derivative(mapping.forward, mapping.derivative, raw)
    if pairs is None or pairs[0].numel() == 0:
        return None
    theirs, central = pairs
    return float((theirs - central).abs().max()) / (max(float(theirs.abs().max()), float(central.abs().max())) + 1e-9)


def _select(tensor: torch.Tensor, dim: int, order: Sequence[int]) -> torch.Tensor:
    """``tensor``'s entries ``order`` along ``dim``, by an index made once on its device
    (:func:`tireg._device.constant`; a Python list would be copied from the host every step)."""
    return tensor.index_select(dim, constant(tuple(order), like=tensor, dtype=torch.long))


def _transform_matrix_and_jacobian(
    transform: Transform, values: torch.Tensor, center: torch.Tensor, order: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ready-made model's ``A`` ``(B, 3, 3)`` and ``dA/dp`` ``(B, P, 3, 3)`` in the model's parameter
    order, from the transform's values ``(B, P)`` (``B = 1`` when all are shared)."""
    matrix = transform.matrix(values, center).reshape(-1, 3, 3)
    jacobian = _select(transform.jacobian(values, center), -3, order).reshape(-1, len(order), 3, 3)
    return matrix, jacobian


def _fused_step(
    raw: list[torch.Tensor],
    mappings: list[Mapping],
    transform: Transform,
    slots: tuple[int, ...],
    order: list[int],
    center: torch.Tensor,
    fixed: torch.Tensor,
    padded: torch.Tensor,
    loss: PerPixelLoss,
    padding_mode: str,
    coordinates: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A ready-made analytic model's whole step, for one compiled graph: values ``m(r)``, ``A``
    and ``dA/dp``, the fused kernel's warped image, cost and ``G``, and ``dL/dr`` (the seed's
    chain rule ``<G, dA/dp_i> m_i'(r_i)``).  The eager model's own pieces, composed: at 256 x 256
    their Python around the kernel costs more than the kernel, and here it compiles away.
    """
    values = _select(_stack_values([mapping(value) for value, mapping in zip(raw, mappings)]), -1, slots)
    matrix, jacobian = _transform_matrix_and_jacobian(transform, values, center, order)
    matrix = matrix.expand(fixed.shape[0], 3, 3)
    moments = fused.bilinear_moments(
        fixed, padded, matrix, loss, padding_mode, return_warped=True, coordinates=coordinates
    )
    gradient = parameter_gradient(moments.matrix_gradient, jacobian)
    return moments.warped, moments.cost.sum(), _raw_gradients(gradient, raw, mappings)


# -- ready-made models for the built-in transforms --------------------------------


class TranslationModel(AffineModel):
    """Translation ``(tx, ty)`` in pixels, autograd."""

    transform, transform_slots = TRANSFORMS["translation"], None


class TranslationModelAnalytic(AffineModelAnalytic):
    """Translation ``(tx, ty)`` in pixels, analytic gradient."""

    transform, transform_slots = TRANSFORMS["translation"], None


class RigidModel(AffineModel):
    """Rigid ``(angle [rad], tx, ty)`` about ``(cx, cy)``, autograd."""

    transform, transform_slots = TRANSFORMS["rigid"], None


class RigidModelAnalytic(AffineModelAnalytic):
    """Rigid ``(angle [rad], tx, ty)`` about ``(cx, cy)``, analytic gradient."""

    transform, transform_slots = TRANSFORMS["rigid"], None


class SimilarityModel(AffineModel):
    """Similarity ``(angle [rad], scale, tx, ty)`` about ``(cx, cy)``, autograd."""

    transform, transform_slots = TRANSFORMS["similarity"], None


class SimilarityModelAnalytic(AffineModelAnalytic):
    """Similarity ``(angle [rad], scale, tx, ty)`` about ``(cx, cy)``, analytic gradient."""

    transform, transform_slots = TRANSFORMS["similarity"], None


class AnisotropicSimilarityModel(AffineModel):
    """Rotation with per-axis scale ``(angle, scale_x, scale_y, tx, ty)`` (the seed's form), autograd."""

    transform, transform_slots = TRANSFORMS["anisotropic_similarity"], None


class AnisotropicSimilarityModelAnalytic(AffineModelAnalytic):
    """Rotation with per-axis scale ``(angle, scale_x, scale_y, tx, ty)`` (the seed's form), analytic."""

    transform, transform_slots = TRANSFORMS["anisotropic_similarity"], None


class FullAffineModel(AffineModel):
    """Full affine ``(a00, a01, a10, a11, tx, ty)`` about ``(cx, cy)``, autograd."""

    transform, transform_slots = TRANSFORMS["affine"], None


class FullAffineModelAnalytic(AffineModelAnalytic):
    """Full affine ``(a00, a01, a10, a11, tx, ty)`` about ``(cx, cy)``, analytic gradient."""

    transform, transform_slots = TRANSFORMS["affine"], None


_READY_MADE: dict[tuple[str, str], type[TransformModel]] = {
    ("translation", "autograd"): TranslationModel,
    ("translation", "analytic"): TranslationModelAnalytic,
    ("rigid", "autograd"): RigidModel,
    ("rigid", "analytic"): RigidModelAnalytic,
    ("similarity", "autograd"): SimilarityModel,
    ("similarity", "analytic"): SimilarityModelAnalytic,
    ("anisotropic_similarity", "autograd"): AnisotropicSimilarityModel,
    ("anisotropic_similarity", "analytic"): AnisotropicSimilarityModelAnalytic,
    ("affine", "autograd"): FullAffineModel,
    ("affine", "analytic"): FullAffineModelAnalytic,
}


def create_model(
    transform: str,
    moving: torch.Tensor,
    *,
    gradients: str = "analytic",
    center: Optional[Sequence[float]] = None,
    padding_mode: str = "zeros",
    interpolation: str = "bilinear",
    loss: Union[str, PerPixelLoss] = "l2",
    metric: Union[str, Metric, None] = None,
    image_gradient: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "exact",
    sigma: float = 1.0,
    compile: Union[bool, str] = "auto",
) -> TransformModel:
    """A ready-made model for a built-in transform, one parameter set per image pair of ``moving``.

    Args:
        transform: a name in :data:`tireg.transforms.TRANSFORMS`.
        moving: ``(B, C, H, W)``; sets the batch size, dtype, device and
            default centre ``((W-1)/2, (H-1)/2)``.
        gradients: ``"analytic"`` or ``"autograd"``.
        center: ``(cx, cy)`` in pixels, the centre of rotation and scale
            (default: ``moving``'s centre).
        padding_mode, interpolation: as :class:`TransformModel`'s
            ``bordermode`` and ``interpolation``.
        loss: per-pixel loss for the analytic model (the autograd model's
            loss is whatever the caller sums).
        metric: a :mod:`tireg.metrics` metric for the analytic model instead of ``loss``.
        image_gradient, sigma: the analytic model's moving-image gradient
            (:class:`AffineModelAnalytic`).

            The autograd model ignores ``loss``, ``metric``, ``image_gradient``
            and ``sigma``: any but their defaults (an L2 loss, no metric,
            ``"exact"``, 1) is refused with ``gradients="autograd"``.
        compile: the analytic model's compiled fast path: ``"auto"`` (default),
            ``True`` or ``False`` (:class:`AffineModelAnalytic`); an autograd
            model takes only ``"auto"`` or ``False``.

    Returns:
        A model on ``moving``'s device and dtype, at the identity transform.
    """
    caller = "create_model()"
    get_transform(transform, caller)
    check_option(gradients, ("analytic", "autograd"), "gradients", caller)
    check_image(moving, "moving", caller)
    check_compile_option(compile, caller)
    if compile is True and gradients != "analytic":
        raise ValueError(f"{caller}: 'compile' applies to the analytic model; got gradients={gradients!r}")
    if center is None:
        center = image_center(*moving.shape[-2:])
    elif isinstance(center, (str, bytes)) or not isinstance(center, (Sequence, np.ndarray, torch.Tensor)) \
            or len(center) != 2:
        raise ValueError(f"{caller}: 'center' must be (cx, cy) in pixels; got {center!r}")
    if gradients == "autograd":
        # the autograd model warps only, and the caller applies the cost: what it would ignore is refused
        # (metric and image_gradient were silently ignored, and so were loss="bogus" and sigma=-5)
        l2 = loss is None or isinstance(get_loss(loss, caller), L2Loss)  # None: L2, as for the analytic model
        given = {name: value for name, value, default in (
            ("loss", loss, l2), ("metric", metric, metric is None),
            ("image_gradient", image_gradient, isinstance(image_gradient, str) and image_gradient == "exact"),
            ("sigma", sigma, real_number(sigma) == 1.0)) if not default}
        if given:
            names = " and ".join(", ".join(f"'{name}'" for name in given).rsplit(", ", 1))
            shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise ValueError(f"{caller}: {names} {'applies' if len(given) == 1 else 'apply'} to the analytic model; "
                             f"got {shown} with gradients='autograd': the autograd model returns the warped image "
                             "and the caller applies the cost")
    cls = _READY_MADE[(transform, gradients)]
    options = dict(interpolation=interpolation, batch_size=moving.shape[0])
    if gradients == "analytic":
        model = cls(
            *center, padding_mode, moving, image_gradient=image_gradient, sigma=sigma, loss_func=loss, metric=metric,
            compile=compile, **options,
        )
    else:
        model = cls(*center, padding_mode, **options)
    return model.to(dtype=moving.dtype, device=moving.device)
