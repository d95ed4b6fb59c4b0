from setuptools import find_packages, setup

# Heavy packages are extras. onnxruntime and onnxruntime-gpu install into the same
# module folder: pick one of the two extras, never both in one environment.
EXTRAS = {
    "export": ["torch>=2.1", "onnx>=1.15", "onnxscript", "safetensors>=0.4"],
    "onnxruntime": ["onnxruntime>=1.17"],
    # the pipeline runtime on a device: prompts to images without torch (tokenizer.json read by tokenizers)
    "runtime": ["onnxruntime>=1.17", "tokenizers>=0.15"],
    "quantize": ["onnxruntime>=1.17", "onnx>=1.15"],  # cfg-export quantize: onnxruntime.quantization needs onnx
    "onnxruntime-gpu": ["onnxruntime-gpu>=1.17"],
    "tensorrt": ["tensorrt>=10", "cuda-python>=12"],
    "progress": ["tqdm"],
    "plot": ["matplotlib"],
    "diffusers": ["diffusers>=0.30", "safetensors>=0.4", "transformers>=4.40", "tokenizers>=0.15"],  # diffusers folders
    "examples": ["scikit-learn>=1.3"],
    # cfg-export serve/request: a tritonserver with its Python backend (the nvidia-pytriton wheel carries one;
    # Triton's container has its own on PATH), the HTTP client, and protobuf for checking model configs
    "serve": ["nvidia-pytriton>=0.7", "tritonclient[http]>=2.40", "protobuf"],
    "dev": ["pytest>=7", "hypothesis>=6", "diffusers>=0.30", "transformers>=4.40", "tokenizers>=0.15",
            "scikit-learn>=1.3", "scipy", "matplotlib", "tqdm",
            "nvidia-pytriton>=0.7; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "tritonclient[http]>=2.40", "protobuf"],
}

# The repository keeps runtime/ and calibration/ at the top (runtime/ is what gets copied
# onto a board and run as `python -m runtime`); installed, they live inside cfg_export.
PACKAGE_DIR = {"cfg_export": "cfg_export", "cfg_export.runtime": "runtime", "cfg_export.calibration": "calibration"}
PACKAGES = (find_packages(include=["cfg_export", "cfg_export.*"])
            + [f"cfg_export.{p}" for p in find_packages(include=["runtime", "runtime.*", "calibration", "calibration.*"])])

setup(
    name="cfg-export",
    version="0.1.0",
    description="Classifier-free-guidance diffusion models from PyTorch to ONNX Runtime and TensorRT",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # runtime/ and calibration/ install as cfg_export.runtime and cfg_export.calibration: generic
    # top-level names like `runtime` would collide with other projects' modules in site-packages.
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # the Python-backend model files copied into Triton repositories (data, not modules of the package)
    package_data={"cfg_export.serving": ["models/*.py"]},
    install_requires=["numpy>=1.22", "click>=8.0", "pillow>=9.0"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cfg-export=cfg_export.cli:main"]},
)
