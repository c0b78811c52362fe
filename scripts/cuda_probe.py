"""What a CUDA machine's timings are bound by: kernel-launch latency and copy bandwidth.

    python scripts/cuda_probe.py            # prints both; about 5 seconds

Read every layer ratio of ``bench_norms.py --device cuda`` against these two figures: a
layer whose time is near ``launches x latency`` is launch-bound (its ratio counts kernels),
one near ``bytes / bandwidth`` is memory-bound (its ratio counts memory traffic).
"""
import argparse
import time

import torch


def launch_latency_us(device: torch.device, launches: int = 2000) -> tuple[float, float]:
    """Per-launch time of a one-element ``add_``: (queued back to back, one synchronize
    per launch). The first is what a training step's queue of small kernels costs."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    torch.cuda.synchronize(device)
    queued = (time.perf_counter() - t0) / launches * 1e6
    t0 = time.perf_counter()
    for _ in range(launches // 10):
        x.add_(1)
        torch.cuda.synchronize(device)
    synced = (time.perf_counter() - t0) / (launches // 10) * 1e6
    return queued, synced


def copy_bandwidth_tbs(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, counting bytes read and written, in TB/s (CUDA events)."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * nbytes / seconds / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    device = torch.device(ap.parse_args().device)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_probe.py: no CUDA device")
    queued, synced = launch_latency_us(device)
    print(f"{torch.cuda.get_device_name(device)}: launch {queued:.1f} us queued, "
          f"{synced:.1f} us with a synchronize each; copy {copy_bandwidth_tbs(device):.2f} TB/s "
          "(read + write)")


if __name__ == "__main__":
    main()
