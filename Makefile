# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if needed, then run the whole DAG on the embedded default and write
#               the HTML report (results/report.html)
#   make test   create .venv if needed, then run the test suite
VENV   ?= .venv
PYTHON ?= python3
CONFIG ?= config/config.yaml
CORES  ?= all
BIN     = $(VENV)/bin

.PHONY: install run report test dry-run clean-results slurm-test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch first, pinned: the CUDA build runs on CPU; unpinned, pip would pick a multi-GB newer one
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/dvc config --global core.analytics false >/dev/null 2>&1 || true
	touch $@

install: $(BIN)/.installed

run: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --configfile $(CONFIG) --report results/report.html

# the HTML report of what the DAG produced (tables, curves, figures), without running anything
report: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --configfile $(CONFIG) --report results/report.html

dry-run: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake -n --configfile $(CONFIG)

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

clean-results:
	rm -rf results/toy results/ci logs .snakemake

# A real single-node Slurm (installed from Debian, root only) running the CI DAG through the
# project's SLURM profile; see tools/slurm/run-dag.sh.
slurm-test: install
	PATH=$(CURDIR)/$(BIN):$$PATH tools/slurm/run-dag.sh
