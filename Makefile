# Plain entry points. `make compress` and `make test` each do all set-up first (idempotent).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup data browser aarch64 compress test test-slow lint bench

setup: data
	$(PIP) install -q -e '.[dev,executorch]'

# Fashion-MNIST from Debian's package (no network needed at run time); skipped where apt is not available.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
		|| echo "note: dataset-fashion-mnist not installed; pf-ray will try torchvision's download"; \
	else echo "note: no apt; pf-ray will look in \$$PF_RAY_DATA, then try torchvision's download"; fi

compress: setup
	pf-ray compress

# Headless Chromium (Debian's package) lets tests/report/test_report_browser.py render the HTML report; the test skips
# where it cannot be installed.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)) \
		|| echo "note: chromium not installed; the report's browser test will be skipped"; \
	else echo "note: no apt; the report's browser test will be skipped"; fi

# The emulated aarch64 environment (Debian's qemu-user and arm64 Python, PyPI's aarch64 ONNX Runtime, an ExecuTorch
# runner cross-compiled against PyPI's aarch64 executorch) in ~/.cache/pf_ray/aarch64 or $PF_RAY_AARCH64_DIR: about
# 15 s once, then a stamp check. Without network it leaves a note and tests/export/test_aarch64.py skips.
aarch64:
	@$(PYTHON) -m pf_ray.aarch64 || echo "note: no aarch64 environment; the aarch64 tests will be skipped"

test: setup browser aarch64
	$(PYTHON) -m pytest -q

test-slow: setup aarch64
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check pf_ray trainables search_algs tests bench
