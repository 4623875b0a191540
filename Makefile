# The README's two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs requirements.txt on first use.
PY := .venv/bin/python

.venv/done: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch .venv/done

demo: .venv/done
	$(PY) demo.py --out runs/demo

test: .venv/done
	$(PY) -m pytest -q tests

.PHONY: demo test
