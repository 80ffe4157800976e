# The README's quick start: `make demo` (set up + main job) and `make test` (set up + whole test suite).
.PHONY: setup demo test compare-demo lock

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
	.lockenv/bin/pip-compile --upgrade --quiet --extra test --constraint lock-constraints.txt --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
