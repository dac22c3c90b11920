"""The GPU smoke check (bench/gpu_smoke/) end to end on the CPU (--quick), so that it works the first time on a lent GPU.

One run of the script (about a minute on two busy cores) is shared by the tests below; the sync
counts are only required to be recorded, not to be zero (other work changes them).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow   # every test here trains or shares a module's training run
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("versions", "stream_parity", "syncs", "speed", "memory", "end_to_end")
ALGORITHMS = ("fixmatch", "daso", "acr")
SPEED_CONFIGS = ("fp32", "tf32", "bf16", "bf16_channels_last")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--device", "cpu", "--quick",
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    assert (out / "smoke.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "smoke.json").read_text()), result


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
def test_every_section_ran_and_the_exit_status_matches_the_checks(smoke: tuple) -> None:
    _, payload, result = smoke
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    assert (result.returncode == 0) == payload["passed"]
    assert payload["passed"] == (not payload["failed_checks"] and not payload["errors"])
    assert payload["device"] == "cpu" and payload["quick"] is True
    for key in SECTIONS:
        section = payload["sections"][key]
        assert section["status"] in ("passed", "failed"), f"{key}: {section['status']}\n{section['error']}"
        assert section["error"] is None
    assert payload["sections"]["versions"]["figures"]["torch"] == torch.__version__


def test_stream_parity_passed(smoke: tuple) -> None:
    checks = smoke[1]["sections"]["stream_parity"]["checks"]
    for name in ("bitwise_strong1", "bitwise_strong2", "on_device_strong1", "on_device_strong2"):
        assert checks[name]["passed"], checks[name]["detail"]
    keys = smoke[1]["sections"]["stream_parity"]["figures"]["strong2_keys"]
    assert {"x", "y", "u_weak", "u_strong[0]", "u_strong[1]", "u_target"} <= set(keys)


def test_sync_counts_are_recorded_per_algorithm(smoke: tuple) -> None:
    section = smoke[1]["sections"]["syncs"]
    steps = len(section["figures"]["setup"]["measured_steps"])
    for name in ALGORITHMS:
        record = section["figures"][name]
        assert "error" not in record, record.get("error")
        for key in ("syncs_per_step_list", "copies_per_step_list"):
            assert len(record[key]) == steps
            assert all(isinstance(count, int) and count >= 0 for count in record[key])
        assert isinstance(record["syncs_total"], int) and record["syncs_total"] >= 0
        assert isinstance(record["copies_total"], int) and record["copies_total"] >= 0
        assert record["syncs_per_step"] == record["syncs_total"] / steps
        assert f"{name}_no_syncs" in section["checks"]  # passes only at zero syncs; either way recorded


def test_speed_and_memory_figures_are_positive(smoke: tuple) -> None:
    speed = smoke[1]["sections"]["speed"]["figures"]
    for name in SPEED_CONFIGS:
        for key in ("step_images_per_s", "bare_images_per_s", "step_peak_mb", "bare_peak_mb", "step_gflop"):
            assert _positive(speed[name][key]), (name, key, speed[name])
    assert _positive(speed["stream"]["images_per_s"])
    memory = smoke[1]["sections"]["memory"]["figures"]
    states = [memory[f"k{k}"]["replica_state_mb_total"] for k in (1, 2, 4)]
    assert all(_positive(memory[f"k{k}"]["peak_mb"]) for k in (1, 2, 4))
    assert states[0] > 0 and states[1] == pytest.approx(2 * states[0]) and states[2] == pytest.approx(4 * states[0])
    assert all(_positive(memory[f"k{k}"]["stream_mb_shared"]) for k in (1, 2, 4))


def test_resume_mid_episode_is_bitwise_and_the_other_runs_are_recorded(smoke: tuple) -> None:
    section = smoke[1]["sections"]["end_to_end"]
    checks = section["checks"]
    for name in ("fixmatch_k2_stopped_mid_episode", "fixmatch_k2_resume_bitwise", "fixmatch_k2_resume_metrics_equal"):
        assert checks[name]["passed"], checks[name]["detail"]
    assert section["figures"]["fixmatch_k2_resume"]["tensors_compared"] > 0
    runs = section["figures"]["runs"]
    assert runs["fixmatch_k2_full"]["launch"] == "python main.py"  # the Hydra command line, as on the GPU
    for name in ("daso", "acr", "twa"):
        assert runs[name]["rc"] is not None and f"{name}_completes" in checks, runs[name]


def test_summary_names_the_device_and_every_section(smoke: tuple) -> None:
    out, payload, result = smoke
    summary = (out / "summary.md").read_text()
    assert payload["device_name"] in summary and "device `cpu`" in summary
    for section in payload["sections"].values():
        assert section["title"] in summary
    assert "fixmatch_k2_resume_bitwise" in summary
    assert summary.strip() in result.stdout  # printed as well


def test_sync_warnings_are_counted_per_step_and_by_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path of section 3, with the sync debug mode replaced by warnings raised here."""
    from bench import gpu_smoke

    modes: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step(index: int) -> None:
        for _ in range(index):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    per_step, by_line, by_frame, others = gpu_smoke._sync_warnings([0, 1, 2], step)
    assert per_step == [0, 1, 2]
    assert modes == ["warn", 0]
    assert sum(by_line.values()) == 3 and all(line.startswith("tests/test_gpu_smoke.py:") for line in by_line)
    assert list(by_frame) == list(by_line)
    assert sum(others.values()) == 3


def test_measured_steps_leave_out_logging_steps() -> None:
    from bench.gpu_smoke import measured_steps

    assert measured_steps(5, 4, 50) == [5, 6, 7, 8]
    assert measured_steps(46, 5, 50) == [46, 47, 48, 50, 51]  # step 49 ends at done=50: logged
