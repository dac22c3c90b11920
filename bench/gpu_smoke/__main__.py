"""`python -m bench.gpu_smoke`: the smoke check (bench/gpu_smoke/__init__.py says what it checks)."""
import sys

from bench.gpu_smoke.cli import main

sys.exit(main())
