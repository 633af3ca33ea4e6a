"""Named hook points and temporary interventions for plain torch networks.

The design follows TransformerLens (Nanda and Bloom, 2022, "TransformerLens"): every intermediate
output of a network passes through an identity module, a :class:`HookPoint`, whose name is its module
path (``"encoder.block1.res0.hook_out"``). A :class:`HookedModule` then offers

- :meth:`HookedModule.run_with_cache`: one forward pass that also returns chosen activations;
- :meth:`HookedModule.intervene`: a context manager that installs forward hooks which add a vector
  (:class:`AddVector`), replace an activation (:class:`Replace`) or patch it from another input
  (:class:`Patch`), and removes them in ``finally`` whatever happens inside the block.

Hook points are ``nn.Identity`` so that a network without installed hooks pays only the cost of an
empty module call. Everything here is plain torch: no Lightning, no TransformerLens dependency.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from innercritic.errors import InnerCriticError

__all__ = [
    "AddVector",
    "HookNameError",
    "HookPoint",
    "HookedModule",
    "Intervention",
    "Patch",
    "Replace",
]


class HookNameError(KeyError, InnerCriticError):
    """An unknown hook-point name; a ``KeyError`` (it is a failed lookup) and a ``ValueError`` (it is a
    bad argument), so callers may catch either."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes; the message is meant to be read as is.
        return str(self.args[0]) if self.args else ""


class HookPoint(nn.Identity):
    """An identity module marking a named activation; ``name`` is set by :meth:`HookedModule.setup_hooks`."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HookedModule(nn.Module):
    """A module whose :class:`HookPoint` submodules can be cached from and intervened on by name.

    Subclasses build their layers, then call :meth:`setup_hooks` at the end of ``__init__``. They
    register their submodules in the order the forward pass uses them, so that :attr:`hook_names`
    (registration order) is the forward order.
    """

    _hook_points: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path and index them; call at the end of ``__init__``."""
        points: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                points[name] = module
        # A plain dict attribute, not a ModuleDict: the points are already submodules, and registering
        # them a second time would list each one under two names.
        self._hook_points = points

    @property
    def hook_names(self) -> list[str]:
        """All hook-point names, in forward order."""
        return list(self._points())

    def hook_point(self, name: str) -> HookPoint:
        """The HookPoint called ``name`` (an unknown name raises :class:`HookNameError`)."""
        return self._points()[self._check_names([name])[0]]

    def hook_shapes(self, example_input: Any) -> dict[str, tuple]:
        """Per-sample activation shape of every hook point, from one forward pass on a batched input."""
        with torch.no_grad():
            _, cache = self.run_with_cache(example_input)
        return {name: tuple(act.shape[1:]) for name, act in cache.items()}

    def run_with_cache(
        self,
        *args: Any,
        names: Sequence[str] | str | None = None,
        detach: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Run ``self(*args, **kwargs)`` and return its output with the activations at ``names``.

        ``names=None`` caches every hook point the forward pass reaches, in forward order; explicit
        names come back in the order asked, and one the pass does not reach is an error. ``detach``
        cuts the cached tensors from the autograd graph (keep it False for gradient attribution).
        Cached tensors are the activations themselves, not copies: the networks here never modify an
        activation in place, so they stay valid. Active interventions apply first, so the cache holds
        the intervened activations.
        """
        points = self._points()
        wanted = list(points) if names is None else self._check_names(names)
        cache: dict[str, Tensor] = {}
        handles = []
        try:
            for name in wanted:
                handles.append(points[name].register_forward_hook(_cache_hook(cache, name, detach)))
            output = self(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if names is None:
            return output, cache
        missing = [name for name in wanted if name not in cache]
        if missing:
            raise RuntimeError(f"the forward pass of {type(self).__name__} did not reach hook point(s) {missing}")
        return output, {name: cache[name] for name in wanted}

    @contextmanager
    def intervene(self, interventions: Mapping[str, Intervention]) -> Iterator[None]:
        """Install ``interventions`` (hook name -> Intervention) for the duration of the ``with`` block.

        All names are checked before anything is installed; the hooks are removed in ``finally``, so an
        exception inside the block (or inside the forward pass) leaves the module clean. Blocks nest:
        an inner block's interventions apply after the outer block's ones at the same hook point.
        """
        names = self._check_names(list(interventions))
        for name, intervention in interventions.items():
            if not isinstance(intervention, Intervention):
                raise TypeError(
                    f"intervention at {name!r} is a {type(intervention).__name__}; expected AddVector, Replace or Patch"
                )
        points = self._points()
        handles = []
        try:
            for name in names:
                handles.append(points[name].register_forward_hook(_intervention_hook(interventions[name], name)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _points(self) -> dict[str, HookPoint]:
        try:
            return self._hook_points
        except AttributeError:
            raise RuntimeError(
                f"{type(self).__name__} has no hook index: call self.setup_hooks() at the end of __init__"
            ) from None

    def _check_names(self, names: Sequence[str] | str) -> list[str]:
        # A bare string would otherwise be iterated character by character.
        names = [names] if isinstance(names, str) else list(names)
        points = self._points()
        for name in names:
            if name not in points:
                close = difflib.get_close_matches(str(name), list(points), n=3, cutoff=0.5)
                hint = "closest: " + ", ".join(repr(c) for c in close) if close else "no close match"
                raise HookNameError(
                    f"unknown hook point {name!r} in {type(self).__name__} ({hint}); "
                    f"list all {len(points)} with model.hook_names"
                )
        return names


def _cache_hook(cache: dict[str, Tensor], name: str, detach: bool) -> Callable:
    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        cache[name] = output.detach() if detach else output

    return hook


def _intervention_hook(intervention: Intervention, name: str) -> Callable:
    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return intervention(output, name)

    return hook


# eq=False: generated __eq__ would compare tensors elementwise and fail; identity equality keeps them hashable.
@dataclass(eq=False)
class Intervention:
    """Base class: maps the activation (batch first) at a hook point to the activation passed on."""

    def __call__(self, activation: Tensor, name: str = "?") -> Tensor:
        raise NotImplementedError


@dataclass(eq=False)
class AddVector(Intervention):
    """Add ``coeff * vector`` to the activation, optionally only at spatial squares ``positions``.

    ``vector`` has the per-sample activation shape (a leading batch dimension of 1 is accepted), the
    full batch shape (one vector per sample, e.g. each maze's own contrast vector), or shape ``(C,)``
    for a ``(C, H, W)`` activation, broadcast over space. ``positions`` is a list of
    ``(h, w)`` squares of a conv activation; the other squares are left bit-for-bit unchanged.
    """

    vector: Tensor  # per-sample activation shape, (1, *per-sample), (batch, *per-sample) or (C,) for a (C, H, W) activation
    coeff: float = 1.0  # the steering coefficient; 0 reproduces the unsteered network exactly
    positions: Sequence[tuple[int, int]] | None = None  # (h, w) squares of a conv activation; None = all

    def __call__(self, activation: Tensor, name: str = "?") -> Tensor:
        # Validate even at coeff 0, so that a scan starting at 0 fails on a bad vector at its first step.
        vector = _fit(self.vector, activation, name, "AddVector", "vector", allow_channel=True, allow_batch=True)
        mask = None if self.positions is None else _position_mask(self.positions, activation, name, "AddVector")
        if self.coeff == 0:
            # Return the input itself: x + 0.0 * v is not the identity in floating point (-0.0 + 0.0 is
            # +0.0, and 0.0 * inf is NaN), and coefficient 0 must reproduce the unsteered network bit for bit.
            return activation
        shifted = activation + self.coeff * vector
        if mask is None:
            return shifted
        # where(), not act + mask * delta: untouched squares keep their exact bits (again -0.0, inf).
        return torch.where(mask, shifted, activation)


@dataclass(eq=False)
class Replace(Intervention):
    """Replace the activation by ``value``: per-sample shape (broadcast over the batch) or the full
    batch shape."""

    value: Tensor  # per-sample activation shape, (1, *per-sample) or (batch, *per-sample)

    def __call__(self, activation: Tensor, name: str = "?") -> Tensor:
        value = _fit(self.value, activation, name, "Replace", "value", allow_channel=False, allow_batch=True)
        # clone: downstream code must never alias (and so never modify) the caller's tensor.
        return value.expand_as(activation).clone()


@dataclass(eq=False)
class Patch(Intervention):
    """Patch the activation from ``source`` (a stored activation, e.g. a ``run_with_cache`` entry on
    another input), optionally only at spatial squares ``positions`` of a conv activation."""

    source: Tensor  # (batch, *per-sample), (1, *per-sample) or per-sample shape
    positions: Sequence[tuple[int, int]] | None = None  # (h, w) squares of a conv activation; None = all

    def __call__(self, activation: Tensor, name: str = "?") -> Tensor:
        source = _fit(self.source, activation, name, "Patch", "source", allow_channel=False, allow_batch=True)
        if self.positions is None:
            return source.expand_as(activation).clone()
        mask = _position_mask(self.positions, activation, name, "Patch")
        return torch.where(mask, source, activation)


def _fit(
    tensor: Tensor, activation: Tensor, name: str, kind: str, what: str, allow_channel: bool, allow_batch: bool
) -> Tensor:
    """``tensor`` made broadcastable against ``activation`` (batch first), or a one-line ValueError."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{kind} at hook {name!r}: {what} must be a torch.Tensor, got {type(tensor).__name__}")
    shape, sample = tuple(tensor.shape), tuple(activation.shape[1:])
    if shape == sample or shape == (1, *sample) or (allow_batch and shape == tuple(activation.shape)):
        fitted = tensor
    elif allow_channel and activation.dim() == 4 and shape == (sample[0],):
        fitted = tensor.view(-1, 1, 1)
    else:
        forms = [sample, (1, *sample)]
        if allow_batch:
            forms.append(tuple(activation.shape))
        if allow_channel and activation.dim() == 4:
            forms.append((sample[0],))
        raise InnerCriticError(
            f"{kind} at hook {name!r}: {what} shape {shape} does not fit activation shape {sample} "
            f"(per sample; batch shape {tuple(activation.shape)}); expected one of {forms}"
        )
    return fitted.to(dtype=activation.dtype, device=activation.device)


def _position_mask(positions: Sequence[tuple[int, int]], activation: Tensor, name: str, kind: str) -> Tensor:
    """A boolean (H, W) mask of ``positions`` for a (B, C, H, W) activation."""
    if activation.dim() != 4:
        raise InnerCriticError(
            f"{kind} at hook {name!r}: positions need a (C, H, W) activation, got per-sample shape "
            f"{tuple(activation.shape[1:])}"
        )
    height, width = activation.shape[-2:]
    mask = torch.zeros(height, width, dtype=torch.bool, device=activation.device)
    for position in positions:
        h, w = (int(p) for p in position)
        # Negative indices are refused rather than wrapped: a wrapped square is a silent steering bug.
        if not (0 <= h < height and 0 <= w < width):
            raise InnerCriticError(f"{kind} at hook {name!r}: position {(h, w)} is outside the {height}x{width} grid")
        mask[h, w] = True
    return mask
