"""The torch-free runtime: guided sampling over ONNX Runtime or TensorRT with numpy.

Copy this folder onto a board: it needs only numpy, pillow and a backend.
"""
