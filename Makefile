# The README's quick start: `make demo` (set up + main job) and `make test` (set up + whole test suite).
.PHONY: setup demo test

setup:
	./setup.sh

demo: setup
	.venv/bin/tunesmith generate --model smollm2-135m-instruct \
		--messages '[{"role": "user", "content": "What is the capital of France?"}]'

test: setup
	.venv/bin/python -m pytest -q
