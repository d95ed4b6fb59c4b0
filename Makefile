# `make demo` and `make test` each create (or reuse) .venv and install what they need.
# torch is pinned: an unpinned torch pulls the newest CUDA build (several GB).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
OUT := out

.PHONY: demo test venv clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[export,onnxruntime,dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests -q

CFG := $(VENV)/bin/cfg-export

demo: venv
	$(CFG) onnx examples/digits/denoiser -o $(OUT)/digits --overwrite
	@for w in 0 1 3; do \
	  $(CFG) sample $(OUT)/digits --w $$w --steps 50 --sampler ddim --classes 0,1,2,3,4,5,6,7,8,9 \
	    --n 8 --seed 0 -o $(OUT)/digits_w$$w.png || exit 1; \
	done
	@echo "demo images: $(OUT)/digits_w0.png $(OUT)/digits_w1.png $(OUT)/digits_w3.png (one row per class)"

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
