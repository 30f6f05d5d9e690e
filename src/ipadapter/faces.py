"""Face-identity embeddings for FaceID adapters: ArcFace through insightface, when it and its models are present.

FaceID adapters read a 512-d ArcFace embedding (`normed_embedding` of insightface's `buffalo_l`, the official
choice; the raw `embedding` for "portrait unnorm"). insightface is an optional dependency and its model packs cannot
be downloaded here: `FaceEmbedder` says exactly what is missing. Embeddings computed elsewhere can always be passed
directly (`ImagePrompt(face_id=...)`, `ipadapter generate --face-id FILE`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def default_root() -> Path:
    """insightface's default model root (`~/.insightface`), or $INSIGHTFACE_HOME."""
    return Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface"))


class FaceEmbedder:
    """Detects the largest face in an image and returns its ArcFace embedding (insightface `FaceAnalysis`)."""

    def __init__(self, name: str = "buffalo_l", root: str | os.PathLike | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",), det_size: int = 640,
                 instead: str = "pass precomputed 512-d ArcFace embeddings as face_id") -> None:  # fmt: skip
        """`instead`: what the errors for a missing insightface or model pack suggest doing without them."""
        root = Path(root) if root is not None else default_root()
        folder = root / "models" / name
        try:
            from insightface.app import FaceAnalysis
        except ImportError as e:
            raise ImportError(
                "FaceID from images needs insightface: `pip install insightface onnxruntime`, with the "
                f"{name!r} model pack in {folder}; or {instead}"
            ) from e
        if not folder.is_dir() or not any(folder.glob("*.onnx")):
            raise FileNotFoundError(
                f"insightface model pack {name!r} not found: expected .onnx files in {folder} (it cannot be "
                f"downloaded here; copy it there, or {instead})"
            )
        self.app = FaceAnalysis(name=name, root=str(root), providers=list(providers))
        self.app.prepare(ctx_id=-1 if providers == ("CPUExecutionProvider",) else 0, det_size=(det_size, det_size))

    def _largest(self, image: Image.Image):
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = self.app.get(bgr)
        if not faces:
            raise ValueError(f"no face detected in the {image.size[0]}x{image.size[1]} image")
        return bgr, max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))

    def embed(self, image: Image.Image, normed: bool = True) -> torch.Tensor:
        """(512,) embedding of the largest face; ValueError when no face is found."""
        _, face = self._largest(image)
        return torch.from_numpy(np.asarray(face.normed_embedding if normed else face.embedding, dtype=np.float32))

    def aligned_crop(self, image: Image.Image, size: int = 224) -> Image.Image:
        """The largest face aligned to ArcFace's template by its five landmarks, `size` x `size`: what FaceID-Plus
        adapters read through the image encoder (the official `face_align.norm_crop(image, landmark=face.kps,
        image_size=224)`)."""
        from insightface.utils import face_align

        bgr, face = self._largest(image)
        crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=size)  # (size, size, 3) BGR
        return Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1]))
