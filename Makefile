# qvmd — see README.md. Everything runs as root on Debian 12.
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all deps runtime-deps venv test lint unit demo bench e2e-full clean

all: venv

deps:
	./scripts/install-deps.sh

runtime-deps:
	./scripts/install-deps.sh --runtime

# --system-site-packages: python3-nftables and python3-systemd come from Debian.
$(BIN)/qvmd: pyproject.toml | deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: deps $(BIN)/qvmd

lint: venv
	$(BIN)/ruff check src tests tools bench
	$(BIN)/ruff format --check src tests tools bench
	$(BIN)/mypy src tests tools bench

test: lint
	$(BIN)/pytest -q

demo: venv
	$(BIN)/python tools/demo.py

# Medians, p99 and ratios against baselines run in the same process;
# writes docs/benchmarks.md. `make bench BENCH_ARGS=--quick` for a short run.
bench: venv
	$(BIN)/python -m bench.run --write docs/benchmarks.md $(BENCH_ARGS)

# The debian guest (Debian 12 + real cloud-init) against the real qvmd
# (docs/e2e-debian.md); builds guests/debian once, ~2 min, cached in
# /var/cache/qvmd-guests/debian. `make test` runs it too when QVM_E2E_FULL=1
# or the image is cached (CI sets QVM_E2E_FULL=1).
e2e-full: venv
	QVM_E2E_FULL=1 $(BIN)/pytest -v -s tests/e2e/test_debian_cloudinit.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

# --- installing on a real host -------------------------------------------
# Binaries under PREFIX; D-Bus and polkit only read /usr/share and /etc, so
# those files go there whatever PREFIX is. DESTDIR stages everything.
LIBDIR ?= $(PREFIX)/lib/qvmd
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSDATADIR ?= /usr/share
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DATA_FILES := \
	data/dbus/org.qvm.Net.conf:$(SYSDATADIR)/dbus-1/system.d/org.qvm.Net.conf \
	data/dbus/org.qvm.Net.service:$(SYSDATADIR)/dbus-1/system-services/org.qvm.Net.service \
	data/dbus/org.qvm.Net.xml:$(SYSDATADIR)/dbus-1/interfaces/org.qvm.Net.xml \
	data/polkit/org.qvm.Net.policy:$(SYSDATADIR)/polkit-1/actions/org.qvm.Net.policy \
	data/polkit/50-org.qvm.Net.rules:$(SYSDATADIR)/polkit-1/rules.d/50-org.qvm.Net.rules \
	data/sysusers/qvmd.conf:$(SYSUSERSDIR)/qvmd.conf \
	data/tmpfiles/qvmd.conf:$(TMPFILESDIR)/qvmd.conf \
	data/completion/qvmctl.bash:$(SYSDATADIR)/bash-completion/completions/qvmctl

.PHONY: install uninstall
install: runtime-deps
	$(PYTHON) -m venv --system-site-packages $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/pip install -q --upgrade pip
	$(DESTDIR)$(LIBDIR)/bin/pip install -q .
	# The venv was built under DESTDIR; its scripts must name the final path.
	if [ -n "$(DESTDIR)" ]; then \
	  grep -l '^#!$(DESTDIR)' $(DESTDIR)$(LIBDIR)/bin/* | xargs sed -i '1s|^#!$(DESTDIR)|#!|'; \
	  sed -i 's|$(DESTDIR)||g' $(DESTDIR)$(LIBDIR)/pyvenv.cfg; fi
	install -d $(DESTDIR)$(BINDIR)
	ln -sf $(LIBDIR)/bin/qvmd $(DESTDIR)$(BINDIR)/qvmd
	ln -sf $(LIBDIR)/bin/qvmctl $(DESTDIR)$(BINDIR)/qvmctl
	sed -e 's|^ExecStart=/usr/bin/qvmd|ExecStart=$(BINDIR)/qvmd|' -e 's|^ExecStartPre=+/usr/bin/qvmd|ExecStartPre=+$(BINDIR)/qvmd|' data/systemd/qvmd.service \
	  | install -D -m 0644 /dev/stdin $(DESTDIR)$(UNITDIR)/qvmd.service
	for pair in $(DATA_FILES); do \
	  install -D -m 0644 "$${pair%%:*}" "$(DESTDIR)$${pair#*:}"; done
	@echo "installed; then: systemd-sysusers qvmd.conf && systemd-tmpfiles --create qvmd.conf && systemctl daemon-reload && systemctl enable --now qvmd"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qvmd $(DESTDIR)$(BINDIR)/qvmctl $(DESTDIR)$(UNITDIR)/qvmd.service
	for pair in $(DATA_FILES); do rm -f "$(DESTDIR)$${pair#*:}"; done
	rm -rf $(DESTDIR)$(LIBDIR)
	@echo "state in /var/lib/qvmd and config in /etc/qvmd are kept; remove them by hand"
