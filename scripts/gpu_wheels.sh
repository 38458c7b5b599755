#!/usr/bin/env bash
# Fetch into .whl/ the wheels that scripts/gpu_check.sh installs on a GPU machine with no
# network (docs/gpu.md): what forgetless imports and that machine's image lacks, at the
# versions the test suite runs with. About 5 MiB.
#   bash scripts/gpu_wheels.sh                 # Python 3.12, x86-64 Linux
#   PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl
