"""Loading a checkpoint: the weights-only load against the full unpickler it replaced.

    python -m bench.checkpoint_load [--model wrn28_2] [--k 2] [--repeats 15]

The payload is what a K-replica run writes (student, EMA teacher and SGD momentum per replica, plus
the run state). Three ways to read it, each including the digest check a resume does:
- before: the file as torch.save writes it (one storage per tensor), the full unpickler;
- the same file with the weights-only unpickler (pure Python, slower per storage);
- now: `load_checkpoint` on the file `save_atomic` writes (the flat layout of
  `ssl_imwa.checkpoint.pack_tensors`: a few buffers, the payload's structure and one table of shapes).
The arms alternate, so a change in the machine's load touches all of them. Milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import header
from ssl_imwa.checkpoint import (
    DIGEST_KEY,
    FORMAT_VERSION,
    contents_digest,
    load_checkpoint,
    save_atomic,
)
from ssl_imwa.models import create_model
from ssl_imwa.rng import rng_state


def replica_state(model_name: str) -> dict:
    model = create_model(model_name, 10, 3, bn_momentum=0.001)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "teacher": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict()}


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header(f"checkpoint load: {args.model}, K={args.k}", threads=1))
    payload = {"format_version": FORMAT_VERSION, "fingerprint": {"seed": 0},
               "progress": {"episode": 0, "replica_steps": dict.fromkeys(range(args.k), 10)},
               "replicas": [replica_state(args.model) for _ in range(args.k)],
               "run_state": {"rng": rng_state(torch.device("cpu")), "evaluations": []}}
    with tempfile.TemporaryDirectory() as scratch:
        path, unpacked = Path(scratch) / "latest.pt", Path(scratch) / "unpacked.pt"
        save_atomic(payload, path)
        torch.save({**payload, DIGEST_KEY: contents_digest(payload)}, unpacked)

        def read(weights_only: bool) -> None:
            loaded = torch.load(unpacked, map_location="cpu", weights_only=weights_only)
            assert loaded.pop(DIGEST_KEY) == contents_digest(loaded)

        arms = {
            "before: full unpickler + digest": lambda: read(False),
            "weights-only unpickler + digest, one storage per tensor": lambda: read(True),
            "now: load_checkpoint (weights-only, flat layout)": lambda: load_checkpoint(path, {"seed": 0}),
        }
        results = {name: [] for name in arms}
        for _ in range(args.repeats):  # interleaved: each round times every arm once
            for name, load in arms.items():
                results[name] += timed(load, 1)
        sizes = path.stat().st_size / 2 ** 20, unpacked.stat().st_size / 2 ** 20
    print(f"file {sizes[0]:.1f} MiB packed, {sizes[1]:.1f} MiB one storage per tensor; {args.repeats} loads each "
          "(interleaved)")
    print("| loader | median ms | min ms |\n|---|---|---|")
    for name, times in results.items():
        print(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f} |")


if __name__ == "__main__":
    main()
