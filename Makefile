# Everything a fresh machine needs, from Python 3.11+ alone: uv, the main environment (.venv, from
# uv.lock) and the isolated runtimes (.airloop/runtimes/: serving, torch, validation, mlserver, monitoring). Bytecode is compiled at
# install: every Airflow task is a fresh process, and PYTHONDONTWRITEBYTECODE would make each recompile.
SHELL := /bin/bash
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
export MLFLOW_DISABLE_TELEMETRY := true
# OpenVINO's telemetry forks from a background thread at import and has hung numpy: keep it off.
export CI ?= true

.PHONY: setup system loop loop-production lint test airflow clean

UI_APP := providers/airloop/src/airloop/plugins/ui/app
UI_BUNDLE := providers/airloop/src/airloop/plugins/ui/static/airloop.js

setup: .venv/.synced .airloop/runtimes/serving/.built .airloop/runtimes/torch/.built \
	.airloop/runtimes/validation/.built .airloop/runtimes/mlserver/.built .airloop/runtimes/monitoring/.built \
	$(UI_BUNDLE)

# The UI plugin's React app (Node.js 20.19+ and npm): packages as package-lock.json pins them, then one
# bundle that the plugin serves and the wheel ships.
$(UI_APP)/node_modules/.package-lock.json: $(UI_APP)/package-lock.json
	cd $(UI_APP) && npm ci --no-audit --no-fund

$(UI_BUNDLE): $(UI_APP)/node_modules/.package-lock.json $(UI_APP)/vite.config.ts $(UI_APP)/tsconfig.json \
	$(wildcard $(UI_APP)/src/*)
	cd $(UI_APP) && npm run build

.tools/bin/uv:
	python3 -m venv .tools && .tools/bin/pip install --quiet uv

.venv/.synced: pyproject.toml uv.lock providers/airloop/pyproject.toml | $(UV)
	$(UV) sync --frozen --all-groups --compile-bytecode
	touch $@

.airloop/runtimes/serving/.built: .venv/.synced providers/airloop/src/airloop/runtimes/serving.txt
	.venv/bin/airloop runtimes build serving
	touch $@

# torch (CPU), hummingbird-ml, NNCF, alibi-detect: ~70 s with a warm uv cache, ~3 min cold. uv takes
# torch from PIP_FIND_LINKS / UV_FIND_LINKS when set: PyPI's Linux torch pulls the CUDA build (GBs).
.airloop/runtimes/torch/.built: .venv/.synced providers/airloop/src/airloop/runtimes/torch.txt
	.venv/bin/airloop runtimes build torch
	touch $@

# Great Expectations with pandas and pyarrow only (~40 s): the data gate in an isolated runtime.
.airloop/runtimes/validation/.built: .venv/.synced providers/airloop/src/airloop/runtimes/validation.txt
	.venv/bin/airloop runtimes build validation
	touch $@

# MLServer 1.7 and OpenVINO on numpy 2 (~30 s), the Apache-licensed model server: its own runtime,
# since the serving runtime's seldon-core needs numpy<2.
.airloop/runtimes/mlserver/.built: .venv/.synced providers/airloop/src/airloop/runtimes/mlserver.txt
	.venv/bin/airloop runtimes build mlserver
	touch $@

# NannyML (CBPE: accuracy estimated while labels are pending) for the performance monitor (~20 s warm,
# ~1.5 min cold: it pulls xgboost and lightgbm).
.airloop/runtimes/monitoring/.built: .venv/.synced providers/airloop/src/airloop/runtimes/monitoring.txt
	.venv/bin/airloop runtimes build monitoring
	touch $@

# The reference loop, end to end, on the embedded default (a JSON report lands in .airloop/).
loop: setup
	.venv/bin/airloop loop --dags dags

# The same loop on the production topology, started for real on this machine (docs/deploy.md): PostgreSQL,
# Redis, moto's S3 server, an MLflow server, Airflow with the CeleryExecutor and two workers (~1.5 min more).
loop-production: setup system
	.venv/bin/airloop loop --production --dags dags

lint: .venv/.synced
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Debian packages some tests start for real (Redis: Feast's online store and Celery's broker; PostgreSQL:
# the production topology's databases; Chromium: the browser tests). Needs root to install; tests that
# need one skip with its name when it is missing.
SYSTEM_PACKAGES := redis-server postgresql chromium
system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

test: setup lint
	.venv/bin/python -m pytest -q

# Airflow's own UI on the reference DAGs (the admin password is printed once, and kept in
# .airloop/airflow/simple_auth_manager_passwords.json.generated). The Airloop pages come with the
# installed provider (its airflow.plugins entry point): no plugins folder.
airflow: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH AIRFLOW_HOME=$(CURDIR)/.airloop/airflow AIRLOOP_HOME=$(CURDIR)/.airloop \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__PARALLELISM=4 \
	AIRFLOW__API__HOST=127.0.0.1 .venv/bin/airflow standalone

clean:
	rm -rf .venv .tools .airloop $(UI_APP)/node_modules $(dir $(UI_BUNDLE))
