"""One command that checks the project on a real GPU, and runs end to end on the CPU in CI.

    python -m bench.gpu_smoke --out DIR [--device cuda|cpu] [--quick] [--budget-s 480] [--work DIR]

Writes DIR/smoke.json (every figure and every check with pass/fail, rewritten after each section
so a killed run keeps what it measured) and DIR/summary.md (Markdown, ready to paste into
docs/performance.md), prints the summary, and exits 1 if any check failed or a section broke
(0 otherwise). Sections, each in its own try/except (a failure is recorded with its traceback's
tail and the next section runs):

1. versions: torch, CUDA, cuDNN, the GPUs, Python, the CPU, hydra-core and omegaconf;
2. stream parity: `ssl_imwa.data.TrainStream` with one seed on the CPU and on the device gives bitwise
   the same batches (every key, mu > 0, 1 and 2 strong views; on --device cpu: CPU against CPU);
3. syncs: steady-state `Trainer.step`s of FixMatch, DASO (past its warm-up) and ACR (estimating)
   under `torch.cuda.set_sync_debug_mode("warn")`, warnings counted per step and per source line;
   on cpu the same steps on the `meta` device under `ssl_imwa.sync_audit.SyncAudit`. Passes when a
   step makes no sync;
4. speed: images/s of a FixMatch step in fp32, TF32, bf16 and bf16 + channels_last against the
   bare model's forward + backward and the data stream alone, with peak memory per configuration;
5. memory of K = 1, 2, 4 time-sliced replicas of WRN-28-8 resident on one device;
6. end to end through `python main.py` (Hydra): exact resume mid-episode (fp16, K=2, E=2),
   DASO and ACR in bf16, a TWA merge, and with two or more GPUs the same resume under torchrun.

A time budget (--budget-s, 480 s by default on cuda) skips the optional sections (3-6) and the
end-to-end runs that no longer fit, with a note, rather than overrunning; every subprocess gets a
timeout inside it. Section 6 runs two trainings at once (--jobs); --torchrun forces its torchrun
check with fewer than two GPUs (gloo on the CPU; two ranks on one GPU). --quick shrinks everything
(small CNN, B=8, mu=2, a few steps); `--device cpu --quick` (about 45 s on two busy cores, where
only the uninterrupted run of section 6 goes through main.py and the others run in this process)
is what tests/test_gpu_smoke.py runs.

The package: `harness` (the record, the section runner, and the replicas it measures, built by
ssl_imwa.builders from a composed config), `sections` (1, 2, 4, 5), `syncs` (3), `end_to_end` (6, with
its job scheduler), `report` (summary.md) and `cli` (the command line).

On the lent GPU machine (one H100, Python 3.12, its own torch; hydra-core and omegaconf are not
installed there and nothing can be downloaded there, so they travel as wheels):

  1. here, once:  bash bench/gpu_check.sh --fetch-wheels
     (pip-downloads hydra-core and omegaconf and builds antlr4-python3-runtime 4.9.3, which PyPI
     ships only as an sdist, into .whl/, which it adds to .git/info/exclude);
  2. the device tool's `run`, with carry [".whl"] and timeout_s 600:
         bash bench/gpu_check.sh
     It installs the wheels into /tmp/site (pip --no-index --target), runs the check with
     --device cuda --out $OUT --work /tmp/gpu_smoke_runs, and returns smoke.json, summary.md,
     log.txt and nvidia-smi.txt (the run directories stay on the machine: $OUT takes 8 files).
     Extra arguments are passed on (`bash bench/gpu_check.sh --quick` for a one-minute check).
"""
from __future__ import annotations

from bench.gpu_smoke.cli import build_parser, main
from bench.gpu_smoke.syncs import _sync_warnings, measured_steps

__all__ = ["_sync_warnings", "build_parser", "main", "measured_steps"]
