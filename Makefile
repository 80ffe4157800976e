# The README's quick start: `make demo` (set up + main job) and `make test` (set up + whole test suite).
.PHONY: setup demo test

# Checked when the recipe runs, after setup may have installed it.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
RUN_ENV := $$( [ -e $(TCMALLOC) ] && echo LD_PRELOAD=$(TCMALLOC) )

setup:
	./setup.sh

# LoRA-tune the embedded SmolLM2 on the demo support-routing chat task, scoring it before and after.
# Each run gets a new directory: tunesmith never overwrites a run.
demo: setup
	env $(RUN_ENV) .venv/bin/tunesmith train examples/chat-lora.yaml \
		output_dir=runs/support-chat-lora-$$(date +%Y%m%d-%H%M%S)

test: setup
	.venv/bin/python -m pytest -q
