#!/usr/bin/env bash
# The native peers of benchmarks/peers.py, installed without touching the project's pins
# (issue #11): keras-hub's own requirements would upgrade TensorFlow/Keras, and GluonNLP 0.10's
# would pull numpy 2; both run with what the project already installs.
set -euo pipefail
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip install --no-deps keras-hub==0.32.0
"$PY" -m pip install --no-deps --no-build-isolation gluonnlp==0.10.0
