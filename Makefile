# The README's quick start: `make demo` (set up + main job) and `make test` (set up + whole test suite).
.PHONY: setup setup-fast demo preference-demo test compare-demo lock

# Checked when the recipe runs, after setup may have installed it.
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
RUN_ENV := $$( [ -e $(TCMALLOC) ] && echo LD_PRELOAD=$(TCMALLOC) )

setup:
	./setup.sh

# Set-up plus llama.cpp: the llama-cpp serving backend (`tunesmith serve --backend llama-cpp`) and llama.cpp's own
# GGUF converters (`tunesmith export --gguf`), both from llama-cpp-python's sdist at the lock's version. The sdist is
# downloaded once into .venv/src; pip builds llama.cpp from it (~7 min on 2 CPU cores), skipped when the venv
# already has it. Portable x86-64 flags, AMX off: llama.cpp's default (native) build on this project's VM, which
# advertises AMX, died with "illegal instruction" at its first batched decode; this build runs everywhere AVX2 does.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_PIN = $(shell grep -E '^llama-cpp-python==' requirements.lock)
LLAMA_VERSION = $(patsubst llama-cpp-python==%,%,$(LLAMA_PIN))
LLAMA_SDIST = .venv/src/llama_cpp_python-$(LLAMA_VERSION).tar.gz
# The sdist's vendor/llama.cpp is gone once pip has built it, so the converters are kept here (tunesmith's
# export/converter.py looks for them in the venv's share/tunesmith/llama.cpp): the two scripts, the `conversion`
# package they import, gguf-py as it ships with them, the chat templates a few architectures read, the licence.
# Re-extracted when the stamp (version and file list) differs.
CONVERTERS := .venv/share/tunesmith/llama.cpp
CONVERTER_FILES := convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py/gguf models/templates LICENSE
CONVERTER_STAMP = $(LLAMA_VERSION): $(CONVERTER_FILES)
setup-fast: setup
	[ -f $(LLAMA_SDIST) ] || .venv/bin/python -m pip --disable-pip-version-check -q download --no-deps \
		--no-binary :all: "$(LLAMA_PIN)" -d .venv/src
	.venv/bin/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) .venv/bin/python -m pip --disable-pip-version-check -q install \
		--no-deps --no-cache-dir $(LLAMA_SDIST)
	[ "$$(cat $(CONVERTERS)/STAMP 2>/dev/null)" = "$(CONVERTER_STAMP)" ] || { \
		rm -rf $(CONVERTERS).tmp && mkdir -p $(CONVERTERS).tmp \
		&& tar -xzf $(LLAMA_SDIST) -C $(CONVERTERS).tmp --strip-components=3 \
			$(addprefix llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp/,$(CONVERTER_FILES)) \
		&& echo "$(CONVERTER_STAMP)" > $(CONVERTERS).tmp/STAMP \
		&& rm -rf $(CONVERTERS) && mv $(CONVERTERS).tmp $(CONVERTERS); }

# LoRA-tune the embedded SmolLM2 on the demo support-routing chat task, scoring it before and after.
# Each run gets a new directory: tunesmith never overwrites a run.
demo: setup
	env $(RUN_ENV) .venv/bin/tunesmith train examples/chat-lora.yaml \
		output_dir=runs/support-chat-lora-$$(date +%Y%m%d-%H%M%S)

# Preference-tune the newest finished `make demo` run (examples/preference-dpo.yaml: DPO on the support-routing
# pairs), scoring held-out preference accuracy and the demo's exact match before and after. A config names one run
# directory, so the newest runs/support-chat-lora-* with a run.json is passed as continue_from, as `make demo` passes
# output_dir. PREFERENCE=examples/preference-kto.yaml continues it with KTO on thumbs instead.
PREFERENCE ?= examples/preference-dpo.yaml
DEMO_RUN = $(patsubst %/run.json,%,$(lastword $(sort $(wildcard runs/support-chat-lora-*/run.json))))
preference-demo: setup
	@[ -n "$(DEMO_RUN)" ] || { echo "no finished runs/support-chat-lora-* run to continue: run make demo first" >&2; exit 1; }
	env $(RUN_ENV) .venv/bin/tunesmith train $(PREFERENCE) continue_from=$(DEMO_RUN) \
		output_dir=runs/$(basename $(notdir $(PREFERENCE)))-$$(date +%Y%m%d-%H%M%S)

test: setup
	.venv/bin/python -m pytest -q

# The two demo comparisons (docs/compare.md); their reports are copied to docs/compare/. A re-run skips the
# entries that already finished: delete runs/compare-* first to measure everything afresh.
compare-demo: setup
	env $(RUN_ENV) .venv/bin/tunesmith compare examples/compare-ticket-topics.yaml
	env $(RUN_ENV) .venv/bin/tunesmith compare examples/compare-support-chat.yaml
	for name in ticket-topics support-chat; do \
		mkdir -p docs/compare/$$name && cp runs/compare-$$name/report.* runs/compare-$$name/*.png docs/compare/$$name/; \
	done

# Re-resolve requirements.lock to the newest releases pyproject.toml's ranges allow (pip-tools, in its own
# throw-away venv). Commit a lock update on its own, and only with `make test` green on it.
lock:
	[ -x .lockenv/bin/pip-compile ] || (python3 -m venv .lockenv && .lockenv/bin/pip install -q pip-tools)
	.lockenv/bin/pip-compile --upgrade --quiet --extra test --extra fast --constraint lock-constraints.txt --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
