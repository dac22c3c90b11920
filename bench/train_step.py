"""Steady-state speed of a full training step (FixMatch, or `--algorithm X`), and of the data pipeline.

    python -m bench.train_step --model wrn28_2 --batch 64 --mu 2 --precision bf16 --channels-last
    python -m bench.train_step --model small_cnn --algorithm saw --skip-data   # any registered algorithm

The step is forward (one concatenated batch), losses, backward, SGD, EMA update — the trainer's
real `Trainer.step` on a resident synthetic batch, so only compute is measured. The data part
times `ssl_imwa.data.TrainStream` (sampling, weak + strong augmentation, normalisation) on random
uint8 images. Compare the two images/s figures to see which one limits a run.

`--ceiling` adds the two upper bounds a step is judged against on this machine: the bare model's
forward + backward on the same images (no losses, optimiser or EMA: what any implementation of
the step must at least pay), and the dense matrix-multiply rate in the same precision. The step's
FLOPs are counted with `torch.utils.flop_counter`, so its GFLOP/s can be set beside that rate.

`--device cuda` puts every tensor on the GPU and synchronises it before each clock reading;
`--tf32` lets fp32 matrix multiplies and convolutions use TF32 (without it both are kept in full
fp32, whatever PyTorch's defaults); peak memory is then the GPU's (`max_memory_allocated`).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bench._common import header, peak_memory_mb, reset_peak_memory, synchronize
from ssl_imwa.algorithm import AlgorithmContext, get_algorithm
from ssl_imwa.builders import ReplicaRecipe, assemble_replica, tune_glibc_malloc
from ssl_imwa.config import TrainConfig
from ssl_imwa.data import TrainStream
from ssl_imwa.models import create_model
from ssl_imwa.trainer import PRECISION_DTYPES, Trainer, autocast_factory


class _RepeatBatch:
    """A stream that returns one fixed batch: isolates compute from the data pipeline."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __next__(self) -> dict:
        return self.batch

    def state_dict(self) -> dict:
        return {}


def bench_step(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = TrainConfig(iterations=10_000, batch_size=args.batch, mu=args.mu, precision=args.precision,
                      channels_last=args.channels_last)
    device = torch.device(args.device)
    model = create_model(args.model, 10, 3, bn_momentum=0.001).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()
    context = AlgorithmContext(labeled_counts=[500, 50, 5, 500, 50, 5, 500, 50, 5, 5], total_steps=cfg.iterations,
                               num_unlabeled=args.mu * args.batch, device=device)
    algorithm_cls = get_algorithm(args.algorithm)
    options = {"weak_pass": args.weak_pass} if "weak_pass" in {item.name for item in fields(algorithm_cls.Config)} else {}
    for setting in args.set:   # KEY=VALUE, the value read as YAML (true, 0.5, 3, a string)
        key, value = setting.split("=", 1)
        options[key] = yaml.safe_load(value)
    algorithm = algorithm_cls(algorithm_cls.Config(**options), context)
    for name, head in algorithm.build_heads(model.feature_dim, 10).items():
        model.add_head(name, head.to(device))
    unlabeled = args.mu * args.batch
    shape = (3, args.size, args.size)
    batch = {"x": torch.randn(args.batch, *shape, device=device),
             "x_strong": [torch.randn(args.batch, *shape, device=device)
                          for _ in range(algorithm.num_labeled_strong_views())],
             "y": torch.randint(0, 10, (args.batch,), device=device),
             "u_weak": torch.randn(unlabeled, *shape, device=device),
             "u_strong": [torch.randn(unlabeled, *shape, device=device) for _ in range(algorithm.num_strong_views())],
             "u_index": torch.arange(unlabeled, device=device),   # per-sample state (DARP) sees every row
             "u_target": torch.randint(0, 10, (unlabeled,), device=device),
             "u_is_labeled": torch.zeros(unlabeled, dtype=torch.bool, device=device)}
    if algorithm.balanced_labeled_batch():   # CoSSL's class-balanced labeled batch
        batch.update(x_balanced=torch.randn(args.batch, *shape, device=device),
                     y_balanced=torch.randint(0, 10, (args.batch,), device=device))
    # The run's own assembly (EMA teacher, SGD, an fp16 gradient scaler) around the resident batch.
    replica = assemble_replica(0, model, _RepeatBatch(batch), algorithm, ReplicaRecipe(cfg, algorithm.cfg.ema), device)
    trainer = Trainer(cfg, device)
    images = trainer.images_per_step(replica)
    compile_started = time.perf_counter()
    for step in range(args.warmup):
        trainer.step(replica, step)
    synchronize(device)
    print(f"warm-up ({args.warmup} steps{', includes compilation' if args.compile else ''}): "
          f"{time.perf_counter() - compile_started:.1f} s")
    with FlopCounterMode(display=False) as counter:  # one untimed step: what the step computes
        trainer.step(replica, args.warmup)
    synchronize(device)
    started = time.perf_counter()
    for step in range(args.steps):
        trainer.step(replica, args.warmup + 1 + step)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_step": images, "ms_per_step": 1000 * seconds / args.steps,
            "images_per_s": images * args.steps / seconds, "gflop_per_step": counter.get_total_flops() / 1e9}


def _timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` after `warmup` untimed calls (the device drained before each clock reading)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def bench_bare(args: argparse.Namespace, images: int) -> dict[str, float]:
    """The bare model's forward + backward on `images` images: no losses beyond one cross-entropy,
    no optimiser, no EMA."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(args.model, 10, 3, bn_momentum=0.001).to(device)
    inputs = torch.randn(images, 3, args.size, args.size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (images,), device=device)
    autocast = autocast_factory(args.precision, device)

    def forward_backward() -> None:
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(inputs)["logits"], targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = _timed(forward_backward, args.warmup, args.steps, device)
    return {"bare_images_per_s": images / seconds, "bare_ms": 1000 * seconds}


def bench_gemm(args: argparse.Namespace, side: int = 2048) -> float:
    """Dense side x side matrix-multiply rate in GFLOP/s, in the precision of `args.precision`."""
    device = torch.device(args.device)
    dtype = PRECISION_DTYPES[args.precision]
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    return 2 * side ** 3 / _timed(lambda: a @ b, 3, 20, device) / 1e9


def bench_ceiling(args: argparse.Namespace, images: int) -> dict[str, float]:
    """The bare model's forward + backward on `images` images, and the GEMM rate."""
    return {**bench_bare(args, images), "gemm_gflops": bench_gemm(args)}


def bench_data(args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    pool = 4096
    images = torch.randint(0, 256, (pool, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 10, (pool,), generator=generator)
    stream = TrainStream(
        labeled_images=images, labeled_targets=targets, unlabeled_images=images,
        unlabeled_targets=torch.full((pool,), -1), unlabeled_is_labeled=torch.zeros(pool, dtype=torch.bool),
        batch_size=args.batch, mu=args.mu, num_strong=1, mean=[0.5] * 3, std=[0.25] * 3,
        pad=args.size // 8, hflip=True, cutout=args.size // 2, seed=0, replica=0, episode=0,
        device=device)
    per_batch = args.batch + args.mu * args.batch * 2
    for _ in range(3):
        next(stream)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_batch": per_batch, "ms_per_batch": 1000 * seconds / args.steps,
            "images_per_s": per_batch * args.steps / seconds}


def set_tf32(enabled: bool) -> tuple[bool, bool]:
    """Allow (or forbid) TF32 in fp32 CUDA matrix multiplies and cuDNN convolutions; returns the previous flags."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    return previous


def restore_tf32(previous: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--algorithm", default="fixmatch", help="any registered algorithm, with its default options")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mu", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--tf32", action="store_true", help="CUDA: TF32 for fp32 matmuls and convolutions")
    parser.add_argument("--weak-pass", choices=("joint", "no_grad"), default="joint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the algorithm's config, e.g. --set progressive_alignment=true (CReST+)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (inductor)")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time the bare model's forward+backward and the GEMM rate (upper bounds)")
    parser.add_argument("--target", type=float, default=350.0, help="images/s the step should reach")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    tune_glibc_malloc()  # as every training run does
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    set_tf32(args.tf32)
    print(header(f"{args.algorithm} training step and data pipeline", args.threads, device))
    print(f"# model {args.model} | B={args.batch} mu={args.mu} | {args.size}px | precision {args.precision}"
          f"{' (TF32)' if args.tf32 and args.precision == 'fp32' and device.type == 'cuda' else ''} | "
          f"channels_last {args.channels_last} | compile {args.compile} | weak pass {args.weak_pass} | {args.steps} timed steps after {args.warmup} warm-up")
    reset_peak_memory(device)
    step = bench_step(args)
    print(f"train step : {step['images_per_s']:8.1f} images/s  ({step['ms_per_step']:.1f} ms for "
          f"{step['images_per_step']} images)")
    if args.ceiling:
        bound = bench_ceiling(args, step["images_per_step"])
        gflop = step["gflop_per_step"] / step["images_per_step"]  # per image, as the step computes it
        print(f"bare model : {bound['bare_images_per_s']:8.1f} images/s  (forward + backward of every image, "
              f"nothing else; the step reaches {step['images_per_s'] / bound['bare_images_per_s']:.0%} of it)")
        print(f"FLOPs      : {step['gflop_per_step']:.1f} GFLOP per step ({gflop:.3f} per image) -> the step runs "
              f"at {step['images_per_s'] * gflop:.0f} GFLOP/s")
        print(f"GEMM rate  : {bound['gemm_gflops']:8.1f} GFLOP/s (2048x2048 matmul, {args.precision}); "
              f"{args.target:.0f} images/s would need {args.target * gflop:.0f} GFLOP/s "
              f"({args.target * gflop / bound['gemm_gflops']:.0%} of it)")
    if not args.skip_data:
        data = bench_data(args)
        print(f"data stream: {data['images_per_s']:8.1f} images/s  ({data['ms_per_batch']:.1f} ms for "
              f"{data['images_per_batch']} images: labeled weak + unlabeled weak + strong)")
    print(f"peak memory ({'GPU, max_memory_allocated' if device.type == 'cuda' else 'RSS'}): "
          f"{peak_memory_mb(device):.0f} MB")


if __name__ == "__main__":
    main()
