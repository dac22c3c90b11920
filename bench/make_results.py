"""Regenerate docs/results.md (tables and small PNG plots) from the CPU study's run directories.

    python -m bench.make_results /tmp/study      (from the repository root)

It runs `python -m ssl_imwa.report` on each section of the study (imwa/, algorithms/ plus the
consistent-data baselines, precision/) into docs/results/<section>/, adds the seed-by-seed
tables of bench/study_tables.py, and writes docs/results.md around them with the hand-written
notes kept in docs/results_notes.md.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from bench.study_tables import main as study_tables

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = {
    "imwa": ("IMWA study (issue 4)", ["imwa"]),
    "algorithms": ("Algorithms on consistent and reversed unlabeled data (issue 3)",
                   ["algorithms", "imwa/supervised_s[01]", "imwa/fixmatch_k1_s[01]"]),
    "precision": ("fp32 against bf16 + channels_last", ["precision"]),
}


def report(study: Path, name: str, patterns: list[str]) -> str:
    out = ROOT / "docs" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(study / pattern) for pattern in patterns]
    subprocess.run([sys.executable, "-m", "ssl_imwa.report", *paths, "--out", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    table = (out / "report.md").read_text()
    images = [f"![{png.stem}](results/{name}/{png.name})" for png in sorted(out.glob("*.png"))]
    return table + "\n" + "\n\n".join(images) + "\n"


def main(study: str) -> None:
    study_dir = Path(study)
    parts = [(ROOT / "docs" / "results_notes.md").read_text().rstrip() + "\n"]
    for name, (title, patterns) in SECTIONS.items():
        if not (study_dir / name).is_dir():
            continue
        parts.append(f"\n## {title}\n\nRegenerate: `python -m ssl_imwa.report "
                     + " ".join(f"{study}/{p}" for p in patterns) + f" --out docs/results/{name}`\n")
        if name in ("imwa", "algorithms"):
            table_input = study_dir / name if name == "imwa" else study_dir
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                study_tables([name, str(table_input)])
            parts.append(f"\nSeed by seed (`python -m bench.study_tables {name} {table_input}`), "
                         "final balanced accuracy of the EMA teacher on the 10,000 test images (%):\n\n"
                         + buffer.getvalue())
        parts.append("\nThe report command's table (`--metric balanced_acc`):\n\n" + report(study_dir, name, patterns))
    (ROOT / "docs" / "results.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'docs' / 'results.md'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/study")
