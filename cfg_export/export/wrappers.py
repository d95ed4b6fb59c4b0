"""The export wrappers: a user's denoiser seen as the stacked or the fused graph.

Imports torch at the top: only the export path imports this module.
"""
from __future__ import annotations

import inspect

import torch

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import ModelFacts

EXPECTED_SIGNATURE = "forward(sample, timestep, cond) -> eps"


def check_signature(module: torch.nn.Module) -> None:
    """Raises CfgExportError unless module.forward takes (sample, timestep, cond) positionally."""
    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) >= 3:
        required = [p for p in positional if p.default is p.empty]
        if len(required) <= 3:
            return
    got = ", ".join(p.name for p in params)
    raise CfgExportError(
        f"{type(module).__name__}.forward({got}) does not fit: expected {EXPECTED_SIGNATURE} "
        "(three positional arguments); wrap the model in a module with that signature"
    )


def _first_tensor(out) -> torch.Tensor:
    """diffusers models return an output object with .sample, others a tuple or a tensor."""
    if hasattr(out, "sample"):
        out = out.sample
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


class StackedDenoiser(torch.nn.Module):
    """sample [2N, *S], timestep [2N], cond [2N] -> eps [2N, *S]: one call for both halves.

    The caller puts the conditional rows first and the null rows last; this wrapper
    only calls the model and slices learned-variance channels down to eps.
    """

    def __init__(self, model: torch.nn.Module, facts: ModelFacts):
        super().__init__()
        self.model = model
        self.channels = facts.sample_shape[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = _first_tensor(self.model(sample, timestep, cond))
        if out.shape[1] != self.channels:  # learned variance: [eps; variance] on axis 1
            out = out[:, : self.channels]
        return out


class FusedGuidance(torch.nn.Module):
    """sample [N, *S], timestep [N], cond [N], w [N] -> guided eps [N, *S].

    Inside the graph: stack [cond; null] to 2N rows, one model call, then
    eps = (1 + w) * eps_c - w * eps_u (Ho & Salimans 2021, eq. 6). w is an input.
    """

    def __init__(self, model: torch.nn.Module, facts: ModelFacts, null_cond: torch.Tensor):
        super().__init__()
        self.stacked = StackedDenoiser(model, facts)
        self.register_buffer("null_cond", null_cond)
        self.sample_rank = len(facts.sample_shape)

    def forward(self, sample, timestep, cond, w):
        null = self.null_cond.expand_as(cond)
        eps = self.stacked(torch.cat([sample, sample]), torch.cat([timestep, timestep]), torch.cat([cond, null]))
        eps_c, eps_u = eps.chunk(2)
        w = w.reshape((-1,) + (1,) * self.sample_rank)
        return (1 + w) * eps_c - w * eps_u


def check_output_shape(model: torch.nn.Module, facts: ModelFacts, example: tuple) -> str | None:
    """Runs the model once; returns a note when learned-variance channels will be sliced,
    raises CfgExportError when the forward or its output does not fit the sample."""
    try:
        with torch.no_grad():
            out = _first_tensor(model(*example[:3]))
    except IndexError as exc:
        null = facts.condition.null
        hint = (f"; is the null class {null} beyond the model's class embedding table? (the probe feeds real "
                f"classes and the null class)" if null is not None else "")
        raise CfgExportError(f"calling {type(model).__name__} as {EXPECTED_SIGNATURE} failed: IndexError "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
    except Exception as exc:  # the user's model: whatever it raises is shown in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CfgExportError(f"calling {type(model).__name__} as {EXPECTED_SIGNATURE} failed: {first}") from None
    sample = example[0]
    if not isinstance(out, torch.Tensor):
        raise CfgExportError(f"{type(model).__name__} returned {type(out).__name__}; expected a tensor shaped like sample")
    if tuple(out.shape) == tuple(sample.shape):
        return None
    if out.shape[0] == sample.shape[0] and out.shape[2:] == sample.shape[2:] and out.shape[1] > sample.shape[1]:
        return f"output has {out.shape[1]} channels for {sample.shape[1]} input channels: sliced to eps"
    raise CfgExportError(
        f"{type(model).__name__} output shape {list(out.shape)} does not fit sample shape {list(sample.shape)}"
    )
