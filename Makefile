# dkim-sidecar: the two commands a newcomer runs are `make run` and `make test`.
# Both install what they need (Debian/Ubuntu packages through apt, then a venv in .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# What `make run` needs: a Python with venv and headers, and a C compiler for the C helper.
RUN_PACKAGES := python3 python3-venv python3-dev gcc libc6-dev ca-certificates openssl
# What the tests add: a real Postfix, a real Redis, a real rspamd (in front of the sidecar, as in
# Mailcow), the Docker engine and debootstrap for the container tests, OpenDKIM for the
# side-by-side benchmark. Tests run their own throwaway instances on free loopback ports.
TEST_PACKAGES := $(RUN_PACKAGES) postfix redis-server docker.io debootstrap opendkim opendkim-tools \
	iproute2 procps rspamd

.PHONY: run test lint bench soak system-run system-test venv clean help

help:
	@echo "make run    start the milter on inet:127.0.0.1:8891 with a demo key (no Redis needed)"
	@echo "make test   install everything, lint, run the whole test suite"
	@echo "make bench  benchmarks (ours vs dkimpy vs OpenDKIM), never part of make test"
	@echo "make soak   long load tests"

# Install only what is missing, so a second run costs nothing. Postfix is installed with
# "No configuration": the system instance stays off; tests run their own throwaway instances.
# On a systemd machine the Redis, rspamd and OpenDKIM services that this step installed are
# stopped and disabled again (the tests never use them); what was there before is left alone.
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing && \
	  if [ -d /run/systemd/system ]; then \
	    for unit in $$missing; do case "$$unit" in redis-server|rspamd|opendkim) \
	      $(SUDO) systemctl disable --now "$$unit" >/dev/null 2>&1 || true;; esac; done; \
	  fi; \
	fi
endef

system-run:
	$(call apt_install,$(RUN_PACKAGES))

system-test:
	$(call apt_install,$(TEST_PACKAGES))

# The C helper is built by this install (an editable install does not rebuild it): a changed
# _scan.c installs again, so the tests never run an older build than the source.
$(VENV)/.installed: pyproject.toml milter/dkim_sidecar/dkim/_scan.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: system-run venv
	$(PY) -m dkim_sidecar.demo

LINT_DIRS := milter tests $(wildcard bench)

lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy

test: system-test venv lint
	$(VENV)/bin/pytest -m "not soak" -q --no-skips

bench: system-test venv
	$(PY) bench/run.py

soak: system-test venv
	$(VENV)/bin/pytest -m soak -q -s

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
