"""The allow-list of model builders a saved file may name.

``tensorize.json`` records how to build the dense base of a saved student (the model
config's ``_target_`` and arguments). Instantiating an arbitrary ``_target_`` from a file
would let anyone who can write into a shared model folder run code (``torch.load`` of a
pickle, ``shutil`` calls, ...), so :func:`build_registered` only calls tnexp's own
builders, with their named arguments, and never trusts remote code.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from tnexp.errors import ConfigError
from tnexp.models.hf import (
    build_causal_lm,
    build_hf_model,
    smoke_gpt2,
    tiny_gpt2,
    tiny_hf_model,
)
from tnexp.models.resnet import cifar_resnet18, cifar_resnet34, small_resnet

__all__ = ["MODEL_BUILDERS", "build_registered"]

# Every `_target_` of configs/model/*.yaml and configs/debug/smoke/model/*.yaml
# (tests/test_bad_input.py checks that), under
# both its config spelling and its defining module.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "tnexp.models.cifar_resnet18": cifar_resnet18,
    "tnexp.models.cifar_resnet34": cifar_resnet34,
    "tnexp.models.small_resnet": small_resnet,
    "tnexp.models.resnet.cifar_resnet18": cifar_resnet18,
    "tnexp.models.resnet.cifar_resnet34": cifar_resnet34,
    "tnexp.models.resnet.small_resnet": small_resnet,
    "tnexp.models.hf.build_causal_lm": build_causal_lm,
    "tnexp.models.hf.tiny_gpt2": tiny_gpt2,
    "tnexp.models.hf.smoke_gpt2": smoke_gpt2,  # configs/debug/smoke/model/gpt2*.yaml
    "tnexp.models.hf.build_hf_model": build_hf_model,
    "tnexp.models.hf.tiny_hf_model": tiny_hf_model,
}


def build_registered(config: Mapping[str, Any], *, source: str = "the config") -> nn.Module:
    """Build ``config`` (``{"_target_": ..., **kwargs}``) with an allow-listed builder.

    Refuses unknown targets, Hydra's special keys (``_args_``, ``_partial_``, ...),
    arguments the builder does not name, and ``trust_remote_code``. ``source`` names the
    file in error messages.
    """
    target = config.get("_target_")
    fix = "pass the dense architecture yourself: load_tensorized(directory, base=model)."
    if target not in MODEL_BUILDERS:
        close = difflib.get_close_matches(str(target), list(MODEL_BUILDERS), n=2)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"{source} asks to build the base model with {target!r}, which is not one of "
            f"tnexp's model builders ({sorted(set(MODEL_BUILDERS))}); refusing to run it.{hint} "
            f"If the folder is trusted, {fix}"
        )
    builder = MODEL_BUILDERS[target]
    kwargs = {k: v for k, v in config.items() if k != "_target_"}
    special = sorted(k for k in kwargs if k.startswith("_"))
    named = {
        name
        for name, p in inspect.signature(builder).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    unknown = sorted(set(kwargs) - named - set(special))
    if special or unknown:
        raise ConfigError(
            f"{source}: {target} does not take {special + unknown} (it takes {sorted(named)}); "
            f"refusing to build the base model. Remove those keys, or {fix}"
        )
    if kwargs.get("trust_remote_code"):
        raise ConfigError(
            f"{source} asks for trust_remote_code=true, which would run code from the model "
            f"folder; refusing. If the folder is trusted, {fix}"
        )
    return builder(**kwargs)
