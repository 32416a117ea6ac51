# `make demo` and `make test` do all the set-up on a fresh machine: they
# create .venv when it is missing and install the package with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# OpenSSH's sshd, which the tests start on 127.0.0.1, Debian's chromium for the JupyterLab
# browser tests, rsync for the bench's baselines through an emulated link (bench/links.py), and
# Slurm with munge for the Slurm tests, which start their own single-node cluster (installed when
# missing and we are root).
system-deps:
	@missing=""; [ -x /usr/sbin/sshd ] || missing="openssh-server"; [ -x /usr/bin/ssh ] || missing="$$missing openssh-client"; [ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/rsync ] || missing="$$missing rsync"; \
	slurm=""; [ -x /usr/sbin/slurmctld ] || slurm="slurmctld"; [ -x /usr/sbin/slurmd ] || slurm="$$slurm slurmd"; \
	[ -x /usr/bin/sbatch ] || slurm="$$slurm slurm-client"; [ -x /usr/sbin/munged ] || slurm="$$slurm munge"; \
	if [ -n "$$missing$$slurm" ]; then \
	  if [ "$$(id -u)" = 0 ]; then export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
	    { [ -z "$$missing" ] || apt-get install -y -qq $$missing; } && \
	    { [ -z "$$slurm" ] || apt-get install -y -qq --no-install-recommends $$slurm; }; \
	  else echo "the tests need: sudo apt-get install $$missing $$slurm (Slurm: --no-install-recommends)"; exit 1; fi; \
	fi

demo: $(STAMP)
	$(PY) scripts/run_notebook.py examples/notebooks/01_quickstart.ipynb

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build dist *.egg-info

# Seventeen figures against baselines measured in the same run; writes bench/results/latest.json.
bench: $(STAMP) system-deps
	$(PY) bench/run.py
