"""Triton model configurations (config.pbtxt) as Python values, written as protobuf text.

A config is a dict following Triton's ModelConfig message (model_config.proto): strings
are quoted, `Word` values are enum names written bare (TYPE_FP32, KIND_CPU), lists of
dicts are repeated messages. check_config parses the text with Triton's own protobuf
definitions (shipped in tritonclient), so a misspelt field or a wrong type is caught
where the config is written, not when a server loads it.
"""
from __future__ import annotations

from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.manifest import TensorSpec


class Word(str):
    """An enum value of the config (TYPE_FP32, KIND_GPU): written without quotes."""


TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "bytes": "TYPE_STRING", "bool": "TYPE_BOOL"}


def triton_dtype(dtype: str) -> Word:
    """Returns the config's data type (TYPE_FP32, ...) of a numpy dtype name."""
    try:
        return Word(TRITON_DTYPES[dtype])
    except KeyError:
        raise CfgExportError(f"dtype {dtype!r} has no Triton data type; expected one of "
                             f"{', '.join(TRITON_DTYPES)}") from None


def _scalar(value) -> str:
    if isinstance(value, Word):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise CfgExportError(f"config value {value!r}: expected a string, number, bool, list or dict")


def _fields(config: dict, indent: int) -> list[str]:
    pad = "  " * indent
    lines = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_fields(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines += [f"{pad}  {{", *_fields(item, indent + 2), f"{pad}  }}" + ("," if i < len(value) - 1 else "")]
            lines.append(f"{pad}]")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def config_text(config: dict) -> str:
    """Returns the config as protobuf text (the contents of config.pbtxt)."""
    return "\n".join(_fields(config, 0)) + "\n"


def check_config(text: str):
    """Returns the parsed ModelConfig message of config.pbtxt text; raises CfgExportError
    naming the problem when Triton's protobuf definitions refuse it. Needs tritonclient
    (its grpc module carries model_config_pb2) and protobuf."""
    require("google.protobuf", "serve")
    text_format = require("google.protobuf.text_format", "serve")
    model_config_pb2 = require("tritonclient.grpc.model_config_pb2", "serve")
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise CfgExportError(f"model config refused by Triton's model_config.proto: {exc}") from None
    return message


def tensor_config(spec: TensorSpec, batched: bool) -> dict:
    """Returns the config entry of one model input or output. With `batched`, the first
    (row) axis is Triton's batch axis and is left out of dims; a tensor of one value per
    row is declared [1] and reshaped to [] for the model, the documented way to give a
    batched model a [rows] tensor."""
    shape = list(spec.shape[1:] if batched else spec.shape)
    entry = {"name": spec.name, "data_type": triton_dtype(spec.dtype)}
    if batched and not shape:
        entry.update(dims=[1], reshape={"shape": []})
    else:
        entry["dims"] = [-1 if isinstance(size, str) else int(size) for size in shape]
    return entry


def parameters(values: dict) -> list[dict]:
    """Returns the config's `parameters` map (string values) as repeated entries."""
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]
