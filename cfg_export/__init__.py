"""cfg-export: classifier-free-guidance diffusion models from PyTorch to ONNX and TensorRT.

Importing this package imports neither torch nor onnx: the export path imports them
when it runs (`cfg_export.export.export_onnx`).
"""
__version__ = "0.1.0"
