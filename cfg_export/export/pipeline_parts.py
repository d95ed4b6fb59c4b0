"""The stages of a pipeline export: tokenizers, text encoders, denoisers and the VAE
decoder of Stable Diffusion (1.x, 2.x, XL) and DiT, each written by a StageWriter
into its own folder of the artifact. export_pipeline (cfg_export.export.pipelines)
puts them together.

Imports torch at the top: only the export path imports this module.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfg_export.export.loading import quiet_libraries
from cfg_export.export.pipeline_modules import DiTDenoiser, TextEncoder, UNetDenoiser, VaeDecoder
from cfg_export.export.stage_onnx import check_stage, export_stage
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import sha256_file
from cfg_export.runtime.manifest import Condition, Layout, Manifest, ModelFacts, TensorSpec
from cfg_export.runtime.stage_facts import TextEncoderFacts, VaeDecoderFacts

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
SIZE_RANGE = 2  # default image sizes: the model's own size divided and multiplied by this


@dataclass
class ExportOptions:
    opset: int
    check: bool
    tolerance: float
    external_data_bytes: int | None
    min_size: int | tuple[int, int] | None
    max_size: int | tuple[int, int] | None


def read_scheduler_config(folder: Path) -> dict:
    """Returns the pipeline's scheduler config, whole (with its _class_name)."""
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def load_model(folder: Path, key: str, library: str, class_name: str):
    """Returns the component `key` loaded in float32 by its library (diffusers or transformers)."""
    module = require(library, "diffusers")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise CfgExportError(f"{folder / key}: {library} has no class {class_name}")
    kwargs = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False} if library == "diffusers" else \
        {"dtype": torch.float32}
    quiet_libraries()
    try:
        model = cls.from_pretrained(str(folder / key), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CfgExportError(f"{folder / key}: {library} cannot load the {class_name} "
                             f"({str(exc).splitlines()[0]})") from None
    return model.eval()


def load_tokenizer(folder: Path, key: str, class_name: str):
    transformers = require("transformers", "diffusers")
    cls = getattr(transformers, class_name, None) or transformers.AutoTokenizer
    try:
        return cls.from_pretrained(str(folder / key), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CfgExportError(f"{folder / key}: transformers cannot load the {class_name} "
                             f"({str(exc).splitlines()[0]})") from None


class StageWriter:
    """Writes the stages of one pipeline artifact into `root` and keeps its stage table."""

    def __init__(self, root: Path, options: ExportOptions, result):
        self.root = root
        self.options = options
        self.result = result
        self.table: dict[str, dict] = {}

    def versions(self) -> dict:
        import onnx

        versions = {"torch": torch.__version__, "onnx": onnx.__version__}
        for name in ("diffusers", "transformers"):
            try:
                versions[name] = __import__(name).__version__
            except ImportError:
                pass
        return versions

    def tokenizer(self, stage: str, tokenizer, max_length: int | None = None) -> dict:
        """Writes the tokenizer as tokenizer.json (without padding or truncation: the
        runtime sets them from the facts); returns its facts."""
        tokenizers = require("tokenizers", "diffusers")
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        folder = self.root / stage
        folder.mkdir()
        backend.save(str(folder / TOKENIZER_FILE))
        model = json.loads(backend.to_str()).get("model", {})
        facts = {"folder": stage, "model": False, "file": TOKENIZER_FILE,
                 "sha256": sha256_file(folder / TOKENIZER_FILE),
                 "max_length": int(max_length or tokenizer.model_max_length), "pad_id": int(tokenizer.pad_token_id),
                 "pad_token": str(tokenizer.pad_token), "end_of_word_suffix": model.get("end_of_word_suffix")}
        self.table[stage] = facts
        self.result.stages[stage] = f"{TOKENIZER_FILE} ({tokenizer.__class__.__name__})"
        return facts

    def model(self, stage: str, module: torch.nn.Module, manifest: Manifest, example: dict,
              checks: list[tuple[str, dict]]) -> Manifest:
        """Exports `module` as the stage's model.onnx + manifest.json and checks it."""
        start = time.perf_counter()
        folder = self.root / stage
        folder.mkdir(exist_ok=True)
        log.info("exporting stage %s", stage)
        manifest = export_stage(module, manifest, folder, example, self.options.opset,
                                self.options.external_data_bytes)
        if self.options.check:
            self.result.checks += check_stage(module, manifest, folder, checks, stage)
        self.table[stage] = {"folder": stage, "model": True}
        self.result.stages[stage] = (f"{manifest.model_file}"
                                     f"{' + ' + manifest.data_file if manifest.data_file else ''}")
        self.result.stage_seconds[stage] = time.perf_counter() - start
        return manifest

    def save_array(self, stage: str, name: str, array: np.ndarray) -> None:
        folder = self.root / stage
        folder.mkdir(exist_ok=True)
        with open(folder / name, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))


def _producer() -> dict:
    """The versions recorded in each stage manifest."""
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__}


# -- image sizes ---------------------------------------------------------------------------

def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise CfgExportError(f"{what}: got {value!r}, expected pixels: one number or (height, width)") from None
    return h, w


def image_sizes(opt: tuple[int, int], multiple: int, dynamic: bool, options: ExportOptions) -> dict:
    """Returns {"min", "opt", "max": [height, width] in pixels, "multiple": ...}: the sizes the
    graphs take. A static graph (dynamic False) takes its own size only."""
    if not dynamic:
        if options.min_size is not None or options.max_size is not None:
            raise CfgExportError(f"--min-size/--max-size: this pipeline's denoiser takes only its own size "
                                 f"{opt[0]}x{opt[1]} (its position embedding is fixed); drop them")
        return {"min": list(opt), "opt": list(opt), "max": list(opt), "multiple": multiple, "dynamic": False}
    lo = _pair(options.min_size, "--min-size") if options.min_size is not None else \
        tuple(max(multiple, (s // SIZE_RANGE) // multiple * multiple) for s in opt)
    hi = _pair(options.max_size, "--max-size") if options.max_size is not None else tuple(s * SIZE_RANGE for s in opt)
    for flag, size in (("--min-size", lo), ("--max-size", hi)):
        if any(s < multiple or s % multiple for s in size):
            raise CfgExportError(f"{flag}: got {size[0]}x{size[1]}, expected multiples of {multiple} pixels (the VAE "
                                 f"factor times the UNet's downsampling)")
    if not (lo[0] <= opt[0] <= hi[0] and lo[1] <= opt[1] <= hi[1]):
        opt = tuple(min(max(o, a), b) for o, a, b in zip(opt, lo, hi))
        if lo[0] > hi[0] or lo[1] > hi[1]:
            raise CfgExportError(f"--min-size {lo[0]}x{lo[1]} exceeds --max-size {hi[0]}x{hi[1]}")
    return {"min": list(lo), "opt": list(opt), "max": list(hi), "multiple": multiple, "dynamic": True}


# -- text encoders -------------------------------------------------------------------------

def export_text_encoder(writer: StageWriter, stage: str, model, tokenizer_facts: dict, layer: str, pooled: bool,
                        family: str = "clip") -> tuple[TextEncoder, Manifest]:
    """Exports a text encoder: input_ids [2N, L] int64 -> hidden [2N, L, D] (+ pooled [2N, P])."""
    module = TextEncoder(model, layer, pooled).eval()
    length = tokenizer_facts["max_length"]
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    ids = lambda rows: rng.integers(0, vocab, size=(rows, length)).astype(np.int64)  # noqa: E731
    with torch.no_grad():
        out = module(torch.from_numpy(ids(1)))
    hidden = out[0] if pooled else out
    outputs = [TensorSpec("hidden", ("2N", length, int(hidden.shape[-1])), "float32")]
    if pooled:
        outputs.append(TensorSpec("pooled", ("2N", int(out[1].shape[-1])), "float32"))
    facts = TextEncoderFacts(tokenizer=tokenizer_facts["folder"], max_length=length, width=int(hidden.shape[-1]),
                             hidden_layer=layer, pooled_width=int(out[1].shape[-1]) if pooled else None,
                             family=family)
    manifest = Manifest(facts=facts, layout=Layout.STACKED, inputs=(TensorSpec("input_ids", ("2N", length), "int64"),),
                        outputs=tuple(outputs), opset=writer.options.opset, producer=_producer())
    manifest = writer.model(stage, module, manifest, {"input_ids": ids(2)},
                            [("N=1", {"input_ids": ids(2)}), ("N=3", {"input_ids": ids(6)})])
    return module, manifest


def encode_empty(module: TextEncoder, tokenizer, length: int):
    """Returns the module's output for the empty prompt (batch 1), as the pipeline computes it."""
    ids = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return module(ids)


# -- VAE decoder ---------------------------------------------------------------------------

def export_vae_decoder(writer: StageWriter, vae, sizes: dict) -> Manifest:
    """Exports the VAE decoder: latents [N, C, H, W] -> images [N, 3, 8H, 8W] (scale 8 for SD)."""
    config = vae.config
    scale = 2 ** (len(config.block_out_channels) - 1)
    channels = int(config.latent_channels)
    facts = VaeDecoderFacts(latent_channels=channels, scale=scale, scaling_factor=float(config.scaling_factor),
                            shift_factor=getattr(config, "shift_factor", None),
                            latents_mean=getattr(config, "latents_mean", None),
                            latents_std=getattr(config, "latents_std", None),
                            force_upcast=bool(getattr(config, "force_upcast", False)))
    dims = ("H", "W") if sizes["dynamic"] else tuple(s // scale for s in sizes["opt"])
    out_dims = ("height", "width") if sizes["dynamic"] else tuple(sizes["opt"])
    manifest = Manifest(facts=facts, layout=Layout.PLAIN,
                        inputs=(TensorSpec("latents", ("N", channels, *dims), "float32"),),
                        outputs=(TensorSpec("images", ("N", int(config.out_channels), *out_dims), "float32"),),
                        opset=writer.options.opset, producer=_producer())
    rng = np.random.default_rng(1)
    latents = lambda n, size: rng.standard_normal((n, channels, size[0] // scale,  # noqa: E731
                                                   size[1] // scale)).astype(np.float32)
    checks = [("N=1 opt size", {"latents": latents(1, sizes["opt"])})]
    if sizes["dynamic"]:
        checks.append(("N=2 min size", {"latents": latents(2, sizes["min"])}))
    return writer.model("vae_decoder", VaeDecoder(vae).eval(), manifest, {"latents": latents(1, sizes["opt"])}, checks)


# -- denoisers -------------------------------------------------------------------------------

def _schedule(folder: Path, model_dir: Path, notes: list[str]):
    """Returns (NoiseSchedule, prediction) from the pipeline's scheduler config."""
    from cfg_export.export.diffusers_models import _schedule_facts
    from cfg_export.runtime.schedule import NoiseSchedule

    schedule, prediction, _recorded = _schedule_facts(model_dir, notes)
    return NoiseSchedule.from_dict(schedule), prediction


def export_denoiser(writer: StageWriter, module: torch.nn.Module, facts: ModelFacts, sizes: dict, scale: int,
                    condition_feeds) -> Manifest:
    """Exports a stacked denoiser: sample [2N, C, H, W], timestep [2N] float32, the
    condition inputs [2N, ...] -> eps (or v, or velocity) [2N, C, H, W].
    condition_feeds(rows) returns {name: array} for `rows` rows."""
    channels = facts.sample_shape[0]
    dims = ("H", "W") if sizes["dynamic"] else tuple(s // scale for s in sizes["opt"])
    conds = []
    for c in facts.conditions:
        if c.kind.value == "class":
            conds.append(TensorSpec(c.name, ("2N",), "int64"))
        else:
            conds.append(TensorSpec(c.name, ("2N", *c.shape), "float32"))
    inputs = (TensorSpec("sample", ("2N", channels, *dims), "float32"), TensorSpec("timestep", ("2N",), "float32"),
              *conds)
    manifest = Manifest(facts=facts, layout=Layout.STACKED, inputs=inputs,
                        outputs=(TensorSpec("eps", ("2N", channels, *dims), "float32"),),
                        opset=writer.options.opset, producer=_producer())
    rng = np.random.default_rng(2)
    T = facts.schedule.num_train_timesteps

    def feeds(images: int, size) -> dict:
        rows = 2 * images
        return {"sample": rng.standard_normal((rows, channels, size[0] // scale, size[1] // scale)).astype(np.float32),
                "timestep": rng.uniform(0, T - 1, size=rows).astype(np.float32), **condition_feeds(rows)}

    checks = [("N=1 opt size", feeds(1, sizes["opt"]))]
    if sizes["dynamic"]:
        checks.append(("N=2 min size", feeds(2, sizes["min"])))
    return writer.model("denoiser", module, manifest, feeds(1, sizes["opt"]), checks)


def export_stable_diffusion(folder: Path, name: str, writer: StageWriter) -> dict:
    """StableDiffusionPipeline and StableDiffusionXLPipeline; returns the pipeline facts."""
    index = json.loads((folder / "model_index.json").read_text())
    xl = name == "StableDiffusionXLPipeline"
    unet = load_model(folder, "unet", "diffusers", index["unet"][1])
    vae = load_model(folder, "vae", "diffusers", index["vae"][1])
    config = unet.config
    if xl and config.get("addition_embed_type") != "text_time":
        raise CfgExportError(f"{folder / 'unet'}: an SDXL UNet has addition_embed_type 'text_time', this one "
                             f"{config.get('addition_embed_type')!r}")
    if not xl:
        from cfg_export.export.diffusers_models import _embedding_width

        _embedding_width(dict(config), folder / "unet" / "config.json")  # refuses conditions beyond the text
    if config.get("time_cond_proj_dim") is not None:
        raise CfgExportError(f"{folder / 'unet'}: time_cond_proj_dim (guidance embedding, LCM) is not supported")
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = vae_scale * 2 ** (len(config.block_out_channels) - 1)
    sample_size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else \
        (config.sample_size, config.sample_size)
    sizes = image_sizes(tuple(int(s) * vae_scale for s in sample_size), multiple, True, writer.options)

    encoders = [("tokenizer", "text_encoder", "penultimate" if xl else "last", False)]
    if xl:
        encoders.append(("tokenizer_2", "text_encoder_2", "penultimate", True))
    modules, tokenizers, prompt_encoders = [], [], []
    for tok_key, enc_key, layer, pooled in encoders:
        tokenizer = load_tokenizer(folder, tok_key, index[tok_key][1])
        tok_facts = writer.tokenizer(tok_key, tokenizer)
        model = load_model(folder, enc_key, "transformers", index[enc_key][1])
        module, manifest = export_text_encoder(writer, enc_key, model, tok_facts, layer, pooled)
        modules.append(module)
        tokenizers.append(tokenizer)
        prompt_encoders.append({"stage": enc_key, "tokenizer": tok_key})
    lengths = {writer.table[t]["max_length"] for t, *_ in encoders}
    if len(lengths) != 1:
        raise CfgExportError(f"{folder}: the tokenizers take {sorted(lengths)} tokens; SDXL concatenates the two "
                             f"encoders' hidden states, so they must take the same number")
    length = lengths.pop()
    notes = writer.result.notes
    schedule, prediction = _schedule(folder, folder / "unet", notes)
    empty = [encode_empty(m, t, length) for m, t in zip(modules, tokenizers)]
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True)) if xl else False
    if xl:
        hidden = torch.cat([empty[0], empty[1][0]], dim=-1)[0].numpy()
        pooled = empty[1][1][0].numpy()
        proj = int(pooled.shape[-1])
        time_ids = config.projection_class_embeddings_input_dim - proj
        if time_ids != 6 * config.addition_time_embed_dim:
            raise CfgExportError(f"{folder / 'unet'}: projection_class_embeddings_input_dim "
                                 f"{config.projection_class_embeddings_input_dim} != 6 x addition_time_embed_dim + "
                                 f"the pooled width {proj}; requires_aesthetics_score (the refiner) is not supported")
        rule = {"null_rule": "zeros"} if force_zeros else {}
        conditions = [
            Condition("embedding", name="encoder_hidden_states", shape=hidden.shape,
                      null_file=None if force_zeros else "null_encoder_hidden_states.npy", **rule),
            Condition("embedding", name="text_embeds", shape=pooled.shape,
                      null_file=None if force_zeros else "null_text_embeds.npy", **rule),
            Condition("embedding", name="time_ids", shape=(6,), null_rule="copy"),
        ]
        if not force_zeros:
            writer.save_array("denoiser", "null_encoder_hidden_states.npy", hidden)
            writer.save_array("denoiser", "null_text_embeds.npy", pooled)
    else:
        hidden = empty[0][0].numpy()
        conditions = [Condition("embedding", name="cond", shape=hidden.shape, null_file="null_embedding.npy")]
        writer.save_array("denoiser", "null_embedding.npy", hidden)
    facts = ModelFacts(condition=conditions[0], extra_conditions=tuple(conditions[1:]), prediction=prediction,
                       schedule=schedule, sample_shape=(int(config.in_channels), *(s // vae_scale for s in sizes["opt"])),
                       timestep_dtype="float32", scheduler=read_scheduler_config(folder))
    rng = np.random.default_rng(3)

    def condition_feeds(rows: int) -> dict:
        feeds = {c.name: rng.standard_normal((rows, *c.shape)).astype(np.float32) for c in conditions}
        if xl:  # sizes as the pipeline feeds them
            feeds["time_ids"] = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (rows, 1))
        return feeds

    export_denoiser(writer, UNetDenoiser(unet, xl).eval(), facts, sizes, vae_scale, condition_feeds)
    export_vae_decoder(writer, vae, sizes)
    prompt = {"encoders": prompt_encoders, "force_zeros_for_empty_prompt": force_zeros}
    if xl:
        prompt["time_ids"] = ["original_size", "crops_coords_top_left", "target_size"]
        prompt["pooled"] = "text_embeds"
    return {"image_size": sizes, "prompt": prompt}


def export_dit(folder: Path, index: dict, writer: StageWriter) -> dict:
    """DiTPipeline: the transformer (class labels, learned sigma dropped) and the VAE decoder."""
    transformer = load_model(folder, "transformer", "diffusers", index["transformer"][1])
    vae = load_model(folder, "vae", "diffusers", index["vae"][1])
    config = transformer.config
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(config.sample_size) * vae_scale
    sizes = image_sizes((size, size), int(config.patch_size) * vae_scale, False, writer.options)
    notes = writer.result.notes
    schedule, prediction = _schedule(folder, folder / "transformer", notes)
    classes = int(config.num_embeds_ada_norm)
    facts = ModelFacts(condition=Condition("class", num_classes=classes, null=classes), prediction=prediction,
                       schedule=schedule, sample_shape=(int(config.in_channels), int(config.sample_size),
                                                        int(config.sample_size)), timestep_dtype="float32",
                       scheduler=read_scheduler_config(folder), patch_size=int(config.patch_size))
    rng = np.random.default_rng(4)

    def condition_feeds(rows: int) -> dict:
        labels = rng.integers(0, classes, size=rows).astype(np.int64)
        labels[rows // 2:] = classes
        return {"cond": labels}

    module = DiTDenoiser(transformer, int(config.in_channels)).eval()
    export_denoiser(writer, module, facts, sizes, vae_scale, condition_feeds)
    export_vae_decoder(writer, vae, sizes)
    facts = {"image_size": sizes}
    labels = index.get("id2label")
    if isinstance(labels, dict):
        facts["id2label"] = {str(k): str(v) for k, v in labels.items()}
    return facts
