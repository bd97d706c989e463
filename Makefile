# Two commands do everything on a fresh machine:
#   make demo   install, compile the built-in SmolLM2 (its own 4-bit GGUF blocks) and generate with it
#   make test   install and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch is installed first and pinned to the CPU build 2.13.0, so nothing pulls a CUDA torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

demo: install
	$(BIN)/specee-compile smollm2 --out out/smollm2.onnx --quant gguf --force
	$(BIN)/specee-run out/smollm2.onnx --prompt "$(PROMPT)" --max-new-tokens 96

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: install
	$(BIN)/specee-bench smollm2 --out bench-results --force --sweep 0.5,0.6,0.7,0.8,0.9 --tree 4,1+4,4+4,2x2x3+4,1+4:exit

clean:
	rm -rf $(VENV) out bench-results
