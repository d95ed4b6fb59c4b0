"""Prompts to condition rows, torch-free: the pipeline's tokenizers (tokenizer.json, read
by the `tokenizers` package) and its text encoder stages (ONNX or TensorRT), put
together as the diffusers pipeline does:

- StableDiffusionPipeline: the encoder's last hidden state [N, L, D] -> `cond`;
  the null rows are the empty prompt's encoding (stored at export) or the negative prompts.
- StableDiffusionXLPipeline: both encoders' penultimate hidden states, concatenated
  -> encoder_hidden_states [N, L, D1 + D2]; the second encoder's pooled projection ->
  text_embeds [N, P]; time_ids [N, 6] = original size, crop (0, 0), target size. The
  null rows: zeros (force_zeros_for_empty_prompt) or the negative prompts' encodings;
  time_ids the same as the conditional rows.
- StableDiffusion3Pipeline: both CLIP encoders' penultimate hidden states concatenated,
  zero-padded to the T5 encoder's width and joined with T5's last hidden state along the
  sequence -> encoder_hidden_states [N, L_clip + L_t5, D_t5]; both CLIP pooled
  projections concatenated -> pooled_projections [N, P1 + P2]. The null rows: the empty
  prompt's encoding (stored at export) or the negative prompts'.

One rule covers the three: the hidden states of the CLIP encoders are concatenated on
the feature axis; a T5 encoder's (its stage facts say family t5) are joined after them
along the sequence, the CLIP part padded with zeros to T5's width; the pooled outputs
present are concatenated into the condition pipeline.json names ("pooled").
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .backends import Backend, BackendOptions, open_backend
from .errors import CfgExportError, require
from .manifest import NullRule

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    ids: np.ndarray  # [B, L] int64, padded and truncated
    truncated: list[str] = field(default_factory=list)  # one warning per prompt that lost words


class PromptTokenizer:
    """A tokenizer stage of a pipeline artifact: tokenizer.json + its facts (max_length,
    pad id), padding and truncating like transformers' tokenizer(..., padding="max_length",
    truncation=True)."""

    def __init__(self, artifact: Artifact, stage: str):
        tokenizers = require("tokenizers", "runtime")
        entry = artifact.stage_entry(stage)
        path = artifact.verify_file(artifact.stage(stage).directory / entry["file"], entry["sha256"])
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type for unreadable files
            raise CfgExportError(f"{path}: the tokenizers package cannot read it ({exc}); re-export the "
                                 f"pipeline") from None
        self.stage = stage
        self.max_length = int(entry["max_length"])
        self.pad_id = int(entry["pad_id"])
        self.suffix = entry.get("end_of_word_suffix")

    def decode(self, ids) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        if self.suffix:
            text = text.replace(self.suffix, " ").strip()
        return text

    def __call__(self, prompts: list[str]) -> Tokens:
        """Returns the ids [len(prompts), max_length]; prompts longer than max_length tokens
        are truncated (the end token kept) with a warning naming the dropped words."""
        encodings = self.tokenizer.encode_batch(list(prompts))
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        tokens = Tokens(ids)
        for row, encoding in enumerate(encodings):
            full = encoding.ids
            if len(full) > self.max_length:
                dropped = self.decode(full[self.max_length - 1:-1])
                tokens.truncated.append(f"prompt {prompts[row]!r} is longer than the {self.max_length} tokens the "
                                        f"text encoder takes ({self.stage}); dropped: {dropped!r}")
                full = full[:self.max_length - 1] + full[-1:]  # keep the end-of-text token, as truncation does
            ids[row, :len(full)] = full
        return tokens


@dataclass
class PromptConditions:
    conds: dict[str, np.ndarray]  # the conditional rows of each denoiser condition input, [N, ...]
    nulls: dict[str, np.ndarray]  # the null rows (negative prompts, or the artifact's null values)
    warnings: list[str] = field(default_factory=list)
    rows: int = 0  # text encoder rows computed
    seconds: float = 0.0  # time inside the text encoders


# a backend name (each stage opened and closed by its user), or open backends by stage name,
# used as they are and left open (a serving process's model connections)
StageBackends = Mapping[str, Backend]


@contextlib.contextmanager
def stage_backend(artifact: Artifact, stage: str, backend: "str | StageBackends | None",
                  options: BackendOptions | None):
    """Yields an open backend of the stage: backend[stage] when `backend` maps stages to
    open backends (left open), else one opened here by name and closed after."""
    if isinstance(backend, Mapping):
        if options is not None:
            raise CfgExportError("backend options apply when the backends are opened here; the given ones are open")
        if stage not in backend:
            raise CfgExportError(f"no backend given for stage {stage!r}; given: {', '.join(backend)}")
        yield backend[stage]
        return
    with open_backend(artifact, backend, options, stage=stage) as runner:
        yield runner


def _encode(artifact: Artifact, stage: str, ids: np.ndarray, backend: "str | StageBackends | None",
            options: BackendOptions | None) -> tuple[dict[str, np.ndarray], float, str]:
    """Returns (the encoder's outputs, model seconds, its family: clip or t5)."""
    with stage_backend(artifact, stage, backend, options) as encoder:
        out = encoder.infer({"input_ids": ids})
        return out, encoder.last_seconds, encoder.manifest.facts.family


def assemble_hidden(clip: list[np.ndarray], t5: list[np.ndarray]) -> np.ndarray:
    """Returns the denoiser's text condition [B, L, D]: the CLIP hidden states [B, L, Di]
    concatenated on the feature axis; with a T5 encoder's [B, L3, D3] (SD3), padded with
    zeros to D3 and followed by T5's along the sequence: [B, L + L3, D3]."""
    hidden = np.concatenate(clip, axis=-1) if clip else None
    if not t5:
        return hidden
    (t5_hidden,) = t5
    if hidden is None:
        return t5_hidden
    if hidden.shape[-1] > t5_hidden.shape[-1]:
        raise CfgExportError(f"the CLIP hidden states are {hidden.shape[-1]} wide, wider than T5's "
                             f"{t5_hidden.shape[-1]}; re-export the pipeline")
    pad = np.zeros((*hidden.shape[:-1], t5_hidden.shape[-1] - hidden.shape[-1]), hidden.dtype)
    return np.concatenate([np.concatenate([hidden, pad], axis=-1), t5_hidden], axis=-2)


def encode_prompts(artifact: Artifact, prompts: list[str], negatives: list[str] | None, height: int, width: int,
                   backend: "str | StageBackends | None" = None,
                   options: BackendOptions | None = None) -> PromptConditions:
    """Returns the denoiser's condition rows for N prompts and their null rows: the
    negative prompts' encodings (negatives [N]; prompt and negative in one 2N call per
    encoder), or the null values the export stored. backend: a backend name, or open
    backends by stage name (stage_backend)."""
    denoiser = artifact.manifest.facts
    encoders = artifact.pipeline["prompt"]["encoders"]
    n = len(prompts)
    texts = list(prompts) + list(negatives or [])
    result = PromptConditions({}, {})
    clip, t5, pooled = [], [], []
    for entry in encoders:
        tokenizer = artifact.prompt_tokenizer(entry["tokenizer"])
        tokens = tokenizer(texts)
        result.warnings += tokens.truncated
        out, seconds, family = _encode(artifact, entry["stage"], tokens.ids, backend, options)
        result.rows += len(texts)
        result.seconds += seconds
        (t5 if family == "t5" else clip).append(out["hidden"])
        if "pooled" in out:
            pooled.append(out["pooled"])
    encoded = {denoiser.condition.name: assemble_hidden(clip, t5)}
    if pooled:
        encoded[artifact.pipeline["prompt"].get("pooled", "text_embeds")] = np.concatenate(pooled, axis=-1)
    names = [c.name for c in denoiser.conditions]
    for name, rows in encoded.items():
        if name not in names:
            raise CfgExportError(f"{artifact.directory}: the text encoders give {name!r}, which the denoiser does "
                                 f"not take ({', '.join(names)}); re-export the pipeline")
        result.conds[name] = rows[:n]
    if "time_ids" in names:
        result.conds["time_ids"] = np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (n, 1))
    for c in denoiser.conditions:
        if negatives is not None and c.rule is not NullRule.COPY:
            result.nulls[c.name] = encoded[c.name][n:]
        else:
            result.nulls[c.name] = null_rows(artifact, c, result.conds[c.name])
    return result


def null_rows(artifact: Artifact, condition, cond_rows: np.ndarray) -> np.ndarray:
    """The null rows [N, ...] of one embedding condition, by its null rule."""
    rule = condition.rule
    if rule is NullRule.COPY:
        return cond_rows
    if rule is NullRule.ZEROS:
        return np.zeros_like(cond_rows)
    if rule is NullRule.FILE:
        stage = artifact.stage()
        key = ("null", condition.name)
        if key not in stage._cache:
            path = Path(stage.directory) / condition.null_file
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CfgExportError(f"{path}: cannot read the null value of {condition.name!r} ({exc}); "
                                     f"re-export the pipeline") from None
            if value.shape != tuple(condition.shape):
                raise CfgExportError(f"{path}: shape {list(value.shape)}, the manifest says {list(condition.shape)}; "
                                     f"re-export the pipeline")
            stage._cache[key] = value.astype(np.float32)
        return np.broadcast_to(stage._cache[key], cond_rows.shape)
    raise CfgExportError(f"condition {condition.name!r} has no null value in the manifest; re-export the pipeline")
