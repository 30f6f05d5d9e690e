"""The image attention's cost inside one cross-attention layer, at SD1.5's layer shapes: host and device time.

Where `inference_overhead.py` measures the adapter's cost over a whole UNet call, this splits it by layer and by
operation, and times the alternatives to SDPA for attending to a handful of image tokens:

    text SDPA        the layer's own attention over the prompt's 77 keys (what the layer pays anyway)
    image SDPA + add ours on wider layers and on GPUs: SDPA over the T image keys, added in place
    block            ours on narrow layers on CPUs: one matmul over block-diagonal keys, a softmax, one baddbmm
    per-head         q @ k^T (B, H, L, T), a softmax over the last axis, @ v, added in place
    layer plain      the whole diffusers Attention layer, AttnProcessor2_0
    layer ours       the same layer with our processor and one image branch (the SDPA path off a CPU)

For each, "host" is the time the Python side takes to issue one call (a loop of calls without synchronizing: on a GPU
what launching costs; where the device is slower than the host, the queue fills and host time rises to device time)
and "device" the time per call with the device's work included (a loop closed by a synchronize). On a CPU the two are
the same. A UNet call is host-bound where the host times, summed over its layers, exceed the device times.

    python benchmarks/attention_kernels.py                               # CPU, float32, 256 px (seconds)
    python benchmarks/attention_kernels.py --device cuda --dtype float16 --resolution 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def sd15_layers(resolution: int) -> list[tuple[str, int, int]]:
    """(name, query positions L, width) of SD1.5's cross-attention levels at this resolution (8 heads each)."""
    side = resolution // 8
    return [("down/up 1", side * side, 320), ("down/up 2", (side // 2) ** 2, 640),
            ("down/up 3", (side // 4) ** 2, 1280), ("mid", (side // 8) ** 2, 1280)]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(runs: dict, device: torch.device, calls: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (host us, device us) per call in each round}. Every round times each of `runs` once, the order rotating
    from round to round, so that a machine's drift falls on all of them alike (and each round's difference between
    two of them is a paired one)."""
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in runs}
    keys = list(runs)
    with torch.no_grad():
        for fn in runs.values():
            for _ in range(3):
                fn()
        sync(device)
        for r in range(rounds):
            shift = r % len(keys)
            for key in keys[shift:] + keys[:shift]:
                fn = runs[key]
                sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                issued = time.perf_counter()
                sync(device)
                done = time.perf_counter()
                out[key][0].append((issued - start) / calls * 1e6)
                out[key][1].append((done - start) / calls * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latents: / 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2: one image with guidance)")
    parser.add_argument("--tokens", type=int, default=4, help="image tokens (4: base, 16: Plus)")
    parser.add_argument("--calls", type=int, default=50, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from ipadapter.attention import DecoupledAttnProcessor, ImageBranch, IPLayer
    from ipadapter.state import PromptState, TokenGroup

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads, b, t = 8, args.batch, args.tokens
    g = torch.Generator().manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {args.resolution} px, batch {b}, {t} image tokens; "
          f"us per call (host / device), medians of {args.rounds} rounds of {args.calls} calls (every round times "
          f"each column once, in rotating order)\n")
    print("| layer | L x width | text SDPA | image SDPA + add | block | per-head | layer plain | layer ours |")
    print("|---|---|---|---|---|---|---|---|")
    # SD1.5's 16 cross-attention layers: 2 + 2 + 2 in the down blocks, 1 in the middle, 3 + 3 + 3 in the up blocks
    counts = {"down/up 1": 5, "down/up 2": 5, "down/up 3": 5, "mid": 1}
    totals = {"plain": [0.0, 0.0], "ours": [0.0, 0.0]}
    added = [0.0, 0.0]  # (host, device) us that ours adds per UNet call, from paired per-round differences
    for name, length, width in sd15_layers(args.resolution):
        dh = width // heads

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        q, out = randn(b, heads, length, dh), randn(b, heads, length, dh)
        k_text, v_text = randn(b, heads, 77, dh), randn(b, heads, 77, dh)
        k_img, v_img = randn(b, heads, t, dh), randn(b, heads, t, dh)
        merged_q, merged_out = randn(b, length, width), randn(b, length, width)
        k_block, v_block = randn(b, heads * t, width), randn(b, heads * t, width)

        def block():
            scores = torch.bmm(k_block, merged_q.transpose(1, 2))  # (B, H*T, L)
            probs = scores.view(b, heads, t, length).softmax(dim=2).view(b, heads * t, length)
            merged_out.baddbmm_(probs.transpose(1, 2), v_block, alpha=0.5)

        def per_head():
            probs = (q @ k_img.transpose(-1, -2) * dh**-0.5).softmax(dim=-1)  # (B, H, L, T)
            out.add_(probs @ v_img, alpha=0.5)

        attn = Attention(query_dim=width, cross_attention_dim=768, heads=heads, dim_head=dh).to(device, dtype)
        attn.set_processor(AttnProcessor2_0())
        hidden, context = randn(b, length, width), randn(b, 77, 768)
        plain = AttnProcessor2_0()
        ours = DecoupledAttnProcessor(plain)
        state = PromptState(1)
        layer = IPLayer(768, width).to(device, dtype)
        ours.image_branches.append(ImageBranch(None, layer, 0, state))
        cond = randn(1, t, 768)
        state.set_groups([TokenGroup(cond, torch.zeros_like(cond))])
        runs = {
            "text SDPA": lambda: F.scaled_dot_product_attention(q, k_text, v_text),
            "image SDPA + add": lambda: out.add_(F.scaled_dot_product_attention(q, k_img, v_img), alpha=0.5),
            "block": block,
            "per-head": per_head,
            "layer plain": lambda: plain(attn, hidden, context),
            "layer ours": lambda: ours(attn, hidden, context),
        }
        cells = []
        times = timed(runs, device, args.calls, args.rounds)
        for key in runs:
            host, whole = (statistics.median(v) for v in times[key])
            cells.append(f"{host:.0f} / {whole:.0f}")
            if key.startswith("layer "):
                totals[key[6:]][0] += counts[name] * host
                totals[key[6:]][1] += counts[name] * whole
        for i in (0, 1):  # ours minus plain: the median of the rounds' paired differences
            added[i] += counts[name] * statistics.median(
                o - p for o, p in zip(times["layer ours"][i], times["layer plain"][i]))
        print(f"| {name} | {length} x {width} | " + " | ".join(cells) + " |")
    (hp, dp), (ho, do) = totals["plain"], totals["ours"]
    print(f"\nSD1.5's 16 cross-attention layers together: plain {hp:.0f} / {dp:.0f} us, ours {ho:.0f} / {do:.0f} us; "
          f"ours adds {added[0]:.0f} us of host time and {added[1]:.0f} us of device time per UNet call (medians of "
          f"each round's paired difference)")


if __name__ == "__main__":
    main()
