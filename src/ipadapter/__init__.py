"""ipadapter: IP-Adapter image prompts for Stable Diffusion - load, generate, train, evaluate.

The inference path (this namespace) imports neither training nor CLI dependencies.
"""

from .adapter import IPAdapter
from .checkpoint import load_adapter, read_tensors, save_adapter
from .config import AdapterConfig, ResamplerConfig
from .encoders import ImageEncoder, check_encoder
from .variants import VARIANTS, Variant

__all__ = [
    "AdapterConfig",
    "IPAdapter",
    "ImageEncoder",
    "ResamplerConfig",
    "VARIANTS",
    "Variant",
    "check_encoder",
    "load_adapter",
    "read_tensors",
    "save_adapter",
]
__version__ = "0.1.0"
