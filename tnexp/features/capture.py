"""Online teacher feature capture: every slice's input and output from one hooked forward."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tnexp.features.tensors import detach, model_device, same_tensor, same_value, to_device
from tnexp.slicing import Slice, SlicePlan, SlicePlanError, first_tensor

__all__ = ["FeatureCapture", "SliceFeatures"]


@dataclass
class SliceFeatures:
    """What one teacher forward recorded for one slice (tensors detached).

    ``kwargs`` are the extra inputs of the slice's first module (attention mask, position
    ids / embeddings of a decoder layer; extra positional arguments are stored under their
    parameter names), so ``slice.forward(model, input, **kwargs)`` replays the slice.
    KV caches are dropped (``use_cache`` is forced off) because replaying into a live cache
    would grow it. Empty for ResNet blocks and transformer MLPs.
    """

    input: torch.Tensor | None
    output: torch.Tensor | None
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Raised inside the last slice's hook to skip the rest of the teacher forward."""


@dataclass
class _Record:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    kwargs: dict[str, Any] | None = None
    seen_input: bool = False
    seen_output: bool = False
    needs_output: bool = True  # False: the capture may stop before this slice runs
    versions: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.seen_input and (self.seen_output or not self.needs_output)


def _is_kv_cache(value: Any) -> bool:
    """transformers' Cache objects (DynamicCache, ...): live state that a replay would grow."""
    return hasattr(value, "get_seq_length") or type(value).__name__.endswith("Cache")


def _named_extra_inputs(
    module: nn.Module, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Split a call into (first input, every other argument by parameter name)."""
    if args:
        first, rest = args[0], args[1:]
    else:  # called as module(hidden_states=...): the first parameter came as a keyword
        params = list(inspect.signature(module.forward).parameters)
        if not params or params[0] not in kwargs:
            raise SlicePlanError(f"slice module {path!r} was called without any input.")
        kwargs = dict(kwargs)
        first, rest = kwargs.pop(params[0]), ()
    extra: dict[str, Any] = {}
    if rest:
        # GPT-2 passes past_key_values / attention_mask positionally; naming them lets
        # Slice.forward replay the call with keyword arguments only.
        params = list(inspect.signature(module.forward).parameters.values())[1:]
        for param, value in zip(params, rest):
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                raise SlicePlanError(
                    f"slice module {path!r} got {len(rest)} extra positional arguments that "
                    "cannot be named from its signature, so the slice cannot be replayed."
                )
            extra[param.name] = value
        if len(rest) > len(params):
            raise SlicePlanError(f"slice module {path!r} got more positional args than it names.")
    extra.update(kwargs)
    return first, extra


def _pop_residual(s: Slice, extra: dict[str, Any], slice_input: Any) -> dict[str, Any]:
    """The last member's extra inputs without its residual, checked to be the slice input."""
    extra = dict(extra)
    name = next(iter(extra), None)  # the second positional parameter comes first
    residual = extra.pop(name) if name is not None else None
    if not (isinstance(residual, torch.Tensor) and isinstance(slice_input, torch.Tensor)) or (
        not same_tensor(residual, slice_input)
    ):
        raise SlicePlanError(
            f"residual slice {s.name!r}: the second argument of {s.paths[-1]!r} is not the "
            f"input of {s.paths[0]!r}, so the residual cannot be replayed. Use granularity "
            "'layer' or an explicit list of module paths."
        )
    return extra


def _sanitize_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    """Detach tensors; drop KV caches (and turn ``use_cache`` off) so replays are pure."""
    clean: dict[str, Any] = {}
    dropped = False
    for key, value in extra.items():
        if _is_kv_cache(value):
            clean[key] = None
            dropped = True
        else:
            clean[key] = detach(value)
    if dropped and "use_cache" in clean:
        clean["use_cache"] = False
    return clean


class FeatureCapture:
    """Inputs and outputs of every slice of ``plan`` from one forward of ``model``.

    ``capture(inputs)`` runs ``model(inputs)`` (or ``model(**inputs)`` for a dict such as
    ``{"input_ids": ..., "attention_mask": ...}``) under ``torch.no_grad()`` in the model's
    current mode, and returns ``{slice name: SliceFeatures}`` in plan order.

    Hooks are registered at the start of each call and removed in a ``finally``, so the
    model never keeps hooks after a call, even when its forward raises or the caller
    forgets ``close()``; ``close()`` / the context manager only retire the object.

    With ``stop_after_last=True`` the forward is aborted as soon as everything the capture
    needs has been seen; the call then returns only the slice features. That is after the
    last slice's output, or, when no output is wanted (``capture_outputs=False``) and no
    check needs it, before the last slice runs (its input and kwargs are known by then): a
    model's prefix can be run alone this way, even when the slice's weights are not loaded.

    On the first call every multi-module slice (group) is checked to be sequential in the
    data flow: each member's output must be the tensor the next member receives. With
    ``chain=True`` the whole plan is checked the same way (each slice's input is the previous
    slice's output, and every slice gets the first slice's extra inputs), as a caller that
    replays the slices one after the other (the memory-bounded mode) needs.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: SlicePlan | Sequence[Slice],
        *,
        capture_inputs: bool = True,
        capture_outputs: bool = True,
        stop_after_last: bool = False,
        chain: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.plan = plan if isinstance(plan, SlicePlan) else SlicePlan(list(plan))
        if len(self.plan) == 0:
            raise SlicePlanError("FeatureCapture needs at least one slice.")
        self.plan.validate(model)
        self.capture_inputs = capture_inputs
        self.capture_outputs = capture_outputs
        self.stop_after_last = stop_after_last
        self.chain = chain
        self.device = torch.device(device) if device is not None else None
        self.calls = 0
        self._sequences = self._sequences_to_check()
        self._verified = not self._sequences
        self._closed = False

    def _sequences_to_check(self) -> list[list[str]]:
        """Module paths that must be sequential in the data flow, one list per check."""
        if self.chain:
            paths = [p for s in self.plan for p in s.paths]
            return [paths] if len(paths) > 1 else []
        return [list(s.paths) for s in self.plan if len(s.paths) > 1]

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Retire this capture (no hooks outlive a call anyway; see the class docstring)."""
        self._closed = True

    # ------------------------------------------------------------------ capture
    def __call__(self, inputs: Any) -> dict[str, SliceFeatures]:
        if self._closed:
            raise RuntimeError("this FeatureCapture is closed; create a new one.")
        device = self.device or model_device(self.model)
        inputs = to_device(inputs, device)
        verify = not self._verified
        records = {s.name: _Record(needs_output=self._needs_output(s, verify)) for s in self.plan}
        links: dict[str, dict[str, Any]] = {}
        handles = []
        try:
            if verify:  # first, so they record a module's call before a capture hook stops it
                for path in dict.fromkeys(p for seq in self._sequences for p in seq):
                    handles += self._register_link(path, links)
            for s in self.plan:
                handles += self._register(s, records[s.name], records)
            with torch.no_grad():
                try:
                    if isinstance(inputs, Mapping):
                        self.model(**inputs)
                    else:
                        self.model(inputs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        self.calls += 1
        self._check_complete(records)
        if verify:
            for sequence in self._sequences:
                self._check_sequence(sequence, links)
            self._verified = True
        return {
            s.name: SliceFeatures(
                input=records[s.name].input,
                output=records[s.name].output,
                kwargs=records[s.name].kwargs or {},
            )
            for s in self.plan
        }

    capture = __call__

    def _needs_output(self, s: Slice, verify: bool) -> bool:
        """Whether the call must see ``s``'s output (else it may stop before ``s`` runs)."""
        if self.capture_outputs or not self.stop_after_last:
            return True
        if verify and len(s.paths) > 1:
            return True  # the group check follows the data through every member
        return verify and self.chain and s is not self.plan.slices[-1]

    def _stop_if_done(self, records: dict[str, _Record]) -> None:
        if self.stop_after_last and all(r.done for r in records.values()):
            raise _StopForward

    def _register(self, s: Slice, rec: _Record, records: dict[str, _Record]) -> list[Any]:
        first = self.model.get_submodule(s.paths[0])
        last = self.model.get_submodule(s.paths[-1])

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.seen_input:
                raise SlicePlanError(
                    f"slice {s.name!r}: module {s.paths[0]!r} ran twice in one forward (shared "
                    "module); such a module cannot be a slice boundary."
                )
            rec.seen_input = True
            x, extra = _named_extra_inputs(module, s.paths[0], args, kwargs)
            rec.kwargs = _sanitize_kwargs(extra)
            if self.capture_inputs:
                rec.input = first_tensor(x).detach()
                rec.versions.append(("input", rec.input, rec.input._version))
            self._stop_if_done(records)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if rec.seen_output:
                raise SlicePlanError(
                    f"slice {s.name!r}: module {s.paths[-1]!r} ran twice in one forward (shared "
                    "module); such a module cannot be a slice boundary."
                )
            rec.seen_output = True
            if self.capture_outputs:
                rec.output = first_tensor(output).detach()
                rec.versions.append(("output", rec.output, rec.output._version))
            self._stop_if_done(records)

        return [
            first.register_forward_pre_hook(pre_hook, with_kwargs=True),
            last.register_forward_hook(hook),
        ]

    def _register_link(self, path: str, links: dict[str, dict[str, Any]]) -> list[Any]:
        """Hooks recording what ``path`` receives and returns (for the sequence checks)."""
        module = self.model.get_submodule(path)
        link = links.setdefault(path, {})

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x, extra = _named_extra_inputs(module, path, args, kwargs)
            link.setdefault("input", first_tensor(x))
            link.setdefault("kwargs", extra)

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            link.setdefault("output", first_tensor(output))

        return [
            module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post),
        ]

    def _check_sequence(self, paths: list[str], links: dict[str, dict[str, Any]]) -> None:
        owner = {p: s.name for s in self.plan for p in s.paths}
        for a, b in itertools.pairwise(paths):
            out, nxt = links[a].get("output"), links[b].get("input")
            if out is None or nxt is None or not same_tensor(out, nxt):
                raise SlicePlanError(self._not_sequential(owner, a, b))
        first = _sanitize_kwargs(links[paths[0]].get("kwargs", {}))
        slices = {s.name: s for s in self.plan}
        for path in paths[1:]:
            other = _sanitize_kwargs(links[path].get("kwargs", {}))
            s = slices[owner[path]]
            if s.residual and path == s.paths[-1]:
                other = _pop_residual(s, other, links[s.paths[0]].get("input"))
            if set(first) != set(other) or not all(same_value(first[k], other[k]) for k in first):
                where = f"group slice {owner[path]!r}: " if owner[path] == owner[paths[0]] else ""
                raise SlicePlanError(
                    f"{where}{path!r} receives other extra inputs than {paths[0]!r} (e.g. a "
                    "different attention mask), so they cannot be replayed with one set of "
                    "kwargs. Use smaller slices."
                )

    @staticmethod
    def _not_sequential(owner: dict[str, str], a: str, b: str) -> str:
        between = "something runs between them, e.g. a norm, activation, pooling or residual add"
        if owner[a] == owner[b]:
            return (
                f"group slice {owner[a]!r} is not sequential in the data flow: the output of "
                f"{a!r} is not the input of {b!r} ({between}). Group only consecutive blocks "
                "(granularity 'group:<k>') or split this group."
            )
        return (
            f"the slices are not a chain: the output of {a!r} (slice {owner[a]!r}) is not the "
            f"input of {b!r} (slice {owner[b]!r}) ({between}), so they cannot be run one "
            "after the other."
        )

    def _check_complete(self, records: dict[str, _Record]) -> None:
        for s in self.plan:
            rec = records[s.name]
            if not rec.done:
                missing = s.paths[0] if not rec.seen_input else s.paths[-1]
                raise SlicePlanError(
                    f"slice {s.name!r}: module {missing!r} did not run during the forward, so its "
                    "features cannot be captured. Is the path part of the forward for these "
                    "inputs?"
                )
            for what, tensor, version in rec.versions:
                # A later in-place op (e.g. ReLU(inplace=True)) would silently corrupt the
                # captured tensor; the version counter exposes it at no cost.
                if tensor._version != version:
                    raise RuntimeError(
                        f"the captured {what} of slice {s.name!r} was modified in place later in "
                        "the teacher forward (an in-place op such as ReLU(inplace=True) or +=). "
                        "Make that op out-of-place in the teacher."
                    )
