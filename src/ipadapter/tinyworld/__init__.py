"""The tiny world: a procedural image world for testing IP-Adapter end to end on a CPU.

`world` draws scenes and captions, `metrics` scores generated scenes against references and prompts, and
`reader` (imports torch) reads attributes back from images. Only torch-free names are re-exported here.
"""

from ipadapter.tinyworld.metrics import BatchScores, concept_preservation, prompt_following, score_batch
from ipadapter.tinyworld.world import (
    ATTRIBUTES,
    Scene,
    WorldSample,
    caption,
    make_dataset,
    parse_caption,
    render,
    sample_scene,
    vocabulary,
)

__all__ = [
    "ATTRIBUTES",
    "BatchScores",
    "Scene",
    "WorldSample",
    "caption",
    "concept_preservation",
    "make_dataset",
    "parse_caption",
    "prompt_following",
    "render",
    "sample_scene",
    "score_batch",
    "vocabulary",
]
