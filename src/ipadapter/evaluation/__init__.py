"""Measuring image prompts: the paper's CLIP-I / CLIP-T protocol, tiny-world CP / PF, and face metrics."""
