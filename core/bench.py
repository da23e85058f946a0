"""Generator throughput benchmark: `python -m core.bench [--output docs/BENCHMARKS.md]`.

Measures images/s of StyleGAN2-ADA, EG3D and PanoHead with random weights, at the small reference
configs (`sg2_small_seed0`, `eg3d_small_seed0`, `panohead_small_seed0`) and at the official full
configs (the init kwargs of the reference manifests). CPU runs float32; on CUDA both float32
(`force_fp32=True`) and the official mixed-precision scheme are timed. Writes a Markdown table
with a description of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.nets import build_generator

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIRS = (REPO.parent / "shared" / "reference", REPO / "tests" / "fixtures" / "reference")


@dataclass(frozen=True)
class BenchCase:
    kind: str
    label: str
    reference_file: str
    batch: int
    iterations: int


CASES = (
    BenchCase("stylegan2", "small (sg2_small_seed0, 64 px)", "sg2_small_seed0.json", 4, 10),
    BenchCase("stylegan2", "FFHQ 256 (official config)", "manifest_stylegan2_ffhq256.json", 1, 3),
    BenchCase("stylegan2", "FFHQ 1024 (official config)", "manifest_stylegan2_ffhq1024.json", 1, 2),
    BenchCase("eg3d", "small (eg3d_small_seed0, 128 px)", "eg3d_small_seed0.json", 2, 3),
    BenchCase("eg3d", "FFHQ 512, nrr 128 (official config)", "manifest_eg3d_ffhq512-128.json", 1, 2),
    BenchCase("panohead", "small (panohead_small_seed0, 128 px)", "panohead_small_seed0.json", 2, 3),
    BenchCase("panohead", "released, nrr 128 (official config)", "manifest_panohead_released.json", 1, 2),
)


def find_reference(name: str) -> Path | None:
    """The first reference folder holding `name`, or None."""
    for folder in REFERENCE_DIRS:
        if (folder / name).exists():
            return folder / name
    return None


def frontal_camera(batch: int, device: torch.device) -> torch.Tensor:
    """[batch, 25] label of the frontal EG3D camera."""
    from core.nets.camera import camera_label

    return camera_label(0.0, 0.0).to(device).repeat(batch, 1)


def machine_description() -> dict[str, str]:
    """CPU model, core count, torch version and threads, GPU (if any), date, load average."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "CPU": cpu,
        "CPU cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "Python": platform.python_version(),
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "Date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "Load average at the end (1/5/15 min; other jobs slow the numbers down)":
            " / ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    return info


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: BenchCase, device: torch.device, force_fp32: bool) -> dict[str, str]:
    """Build the case's generator (random init) and time `iterations` forward passes after one warm-up."""
    path = find_reference(case.reference_file)
    if path is None:
        raise FileNotFoundError(f"{case.reference_file} not found")
    meta = json.loads(path.read_text())
    torch.manual_seed(0)
    G = build_generator(case.kind, meta["init_kwargs"], meta.get("rendering_kwargs"),
                        meta.get("neural_rendering_resolution")).eval().requires_grad_(False).to(device)
    z = torch.randn(case.batch, G.z_dim, device=device)
    if case.kind == "stylegan2":
        c = torch.zeros(case.batch, G.c_dim, device=device)

        def run():
            return G(z, c, noise_mode="const", force_fp32=force_fp32)
    else:
        c = frontal_camera(case.batch, device)

        def run():
            return G(z, c, noise_mode="const", force_fp32=force_fp32)["image"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        image = run()  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(case.iterations):
            image = run()
        _synchronize(device)
        elapsed = time.perf_counter() - start
    if not torch.isfinite(image).all():
        raise FloatingPointError("non-finite output")
    images = case.batch * case.iterations
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA peak)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (process max RSS)"
    return {
        "resolution": f"{image.shape[-1]} px",
        "images_per_s": f"{images / elapsed:.3g}",
        "s_per_image": f"{elapsed / images:.3g}",
        "memory": memory,
    }


def run_benchmarks(devices: list[torch.device], cases=CASES) -> list[dict[str, str]]:
    """Every case on every device/precision; failures become 'not measured: <reason>' rows."""
    rows = []
    for device in devices:
        precisions = [("float32", True)] + ([("mixed float16", False)] if device.type == "cuda" else [])
        for case in cases:
            for precision, force_fp32 in precisions:
                row = {"kind": case.kind, "config": case.label, "device": device.type, "precision": precision,
                       "batch": str(case.batch), "iterations": str(case.iterations)}
                try:
                    row.update(time_case(case, device, force_fp32))
                except Exception as error:  # noqa: BLE001 - reported in the table
                    row["error"] = f"not measured: {type(error).__name__}: {error}".replace("|", "/")[:200]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, str]], machine: dict[str, str]) -> str:
    lines = ["# Generator benchmarks", "",
             "Produced by `python -m core.bench` (random weights, `noise_mode='const'`, one warm-up pass, then",
             "`iterations` timed passes of `batch` images; EG3D/PanoHead render the frontal camera with the",
             "official stochastic renderer and include super-resolution). CPU always runs float32. On CPU the",
             "memory column is the process-wide high-water mark so far (runs go from small to large).", "",
             "Whole pipelines against the issues' speed targets: [BENCHMARKS_PIPELINES.md](BENCHMARKS_PIPELINES.md)",
             "(`python -m training.bench_pipelines`).", "",
             "## Machine", ""]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    lines += ["", "## Results", "",
              "| Model | Config | Device | Precision | Batch x iters | Output | Images/s | s/image | Peak memory |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['kind']} | {r['config']} | {r['device']} | {r['precision']} | {r['batch']} x {r['iterations']} |"
        if "error" in r:
            lines.append(f"{head} - | {r['error']} | - | - |")
        else:
            lines.append(f"{head} {r['resolution']} | {r['images_per_s']} | {r['s_per_image']} | {r['memory']} |")
    if not torch.cuda.is_available():
        lines += ["", "CUDA: not measured (no GPU on this machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--no-cpu", action="store_true", help="only time CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [] if args.no_cpu else [torch.device("cpu")]
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        devices.append(torch.device("cuda"))
    rows = run_benchmarks(devices)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(to_markdown(rows, machine_description()))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
