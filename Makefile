# Set-up and entry points for a fresh machine: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: demo test

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/nnunet-plugins demo $(ARGS)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest tests $(ARGS)
