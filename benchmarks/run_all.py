"""Runs every benchmark and writes their outputs, as printed, to docs/benchmarks.md.

    python benchmarks/run_all.py [--quick] [--out docs/benchmarks.md] [--only inference_overhead,train_throughput]

Each benchmark measures its comparisons side by side in one run and prints the ratios; this runner only collects
them with the machine, versions and the exact command, so the numbers in the document are produced, not typed.
`--quick` uses smaller settings (minutes instead of tens of minutes on 2 CPU cores).
`--only` reruns the named benchmarks and keeps the other sections of the existing file.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (full arguments, quick arguments, what it shows)
BENCHMARKS: dict[str, tuple[list[str], list[str], str]] = {
    "inference_overhead": (
        ["--models", "tinyworld,sd15", "--seconds", "120", "--min-rounds", "6"],
        ["--models", "tinyworld,sd15", "--seconds", "10", "--min-rounds", "3"],
        "seconds per denoising step: plain UNet, our adapter, diffusers' built-in IP-Adapter (target: ours <= 2% "
        "and below diffusers')",
    ),
    "train_throughput": (
        ["--samples", "256", "--batch-size", "16", "--steps", "30", "--rounds", "3"],
        ["--samples", "64", "--batch-size", "16", "--steps", "8"],
        "training samples/s on the tiny world: our trainer with the embedding cache vs a tutorial_train.py-style loop",
    ),
    "train_throughput_sd15": (
        ["--proportions", "sd15", "--resolution", "256", "--samples", "16", "--batch-size", "2", "--steps", "16",
         "--rounds", "2"],
        ["--proportions", "sd15", "--resolution", "256", "--samples", "8", "--batch-size", "2", "--steps", "3"],
        "the same at SD1.5 + ViT-H proportions (real depths, half widths, random weights)",
    ),
    "train_throughput_sd15_bf16": (
        ["--proportions", "sd15", "--resolution", "256", "--samples", "16", "--batch-size", "2", "--steps", "16",
         "--mixed-precision", "bf16", "--rounds", "2"],
        ["--proportions", "sd15", "--resolution", "256", "--samples", "8", "--batch-size", "2", "--steps", "3",
         "--mixed-precision", "bf16"],
        "the same in bf16 (both loops: frozen models in bf16, the official-style UNet float32 under autocast as in "
        "tutorial_train.py); on CPUs with AVX512-BF16 or AMX",
    ),
    "train_throughput_compile": (
        ["--samples", "256", "--batch-size", "16", "--steps", "60", "--compile", "inductor"],
        ["--samples", "64", "--batch-size", "16", "--steps", "8", "--compile", "inductor"],
        "the tiny world again, with a row for our trainer with `--compile inductor` (its one-time compilation is "
        "printed apart, not counted in samples/s)",
    ),
    "tinyworld_targets": (
        ["--n", "200", "--out", "docs/tinyworld_targets.md"],  # relative to the repository (the cwd)
        ["--n", "40", "--scales", "0,0.5,1.0"],
        "the tiny world's targets: text PF, image CP, image + text CP / PF and the scale sweep",
    ),
}


def script_of(name: str) -> Path:
    return HERE / (name.removesuffix("_compile").removesuffix("_bf16").removesuffix("_sd15") + ".py")


def cpu_model() -> str:
    """The processor's marketing name where Linux tells it (platform.processor() often says only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    parser.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every benchmark (default: 1)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; expected names from {list(BENCHMARKS)}")
    import torch

    machine = (f"{cpu_model()}, {platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}, {args.threads} torch thread(s)")  # fmt: skip
    sections = read_sections(Path(args.out)) if args.only else {}  # --only keeps the other benchmarks' sections
    for name in names:
        full, quick, what = BENCHMARKS[name]
        extra = quick if args.quick else full
        if name != "tinyworld_targets":
            extra = [*extra, "--threads", str(args.threads)]
        cmd = [sys.executable, str(script_of(name)), *extra]
        print("running", " ".join(cmd[1:]), flush=True)
        started = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        seconds = time.time() - started
        output = result.stdout.strip() if result.returncode == 0 else (result.stdout + result.stderr)[-3000:]
        status = "" if result.returncode == 0 else f", FAILED with exit code {result.returncode}"
        sections[name] = "\n".join([
            f"## {name}", "", what + ".", "", "```", f"$ python benchmarks/{script_of(name).name} {' '.join(extra)}",
            output, "```", "", f"({seconds:.0f} s on {datetime.date.today().isoformat()}{status}; {machine})", "",
        ])  # fmt: skip
        print(output, flush=True)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/run_all.py{' --quick' if args.quick else ''}`; each section names the day and "
        "machine it was measured on. Every ratio below was measured side by side in one run.",
        "",
    ]
    lines += [sections[name] for name in BENCHMARKS if name in sections]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("wrote", args.out)


def read_sections(path: Path) -> dict[str, str]:
    """The `## name` sections of an existing benchmarks file, by benchmark name."""
    if not path.is_file():
        return {}
    sections: dict[str, str] = {}
    name = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            sections[name] = line
        elif name is not None:
            sections[name] += "\n" + line
    return {k: v for k, v in sections.items() if k in BENCHMARKS}


if __name__ == "__main__":
    main()
