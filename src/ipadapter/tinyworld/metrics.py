"""Tiny-world metrics, mirroring the DreamBench-style columns used to compare image-prompt methods.

- concept preservation (CP): how many of the reference image's attributes a generated image keeps;
- prompt following (PF): how many of the attributes the text prompt states a generated image shows;
- CP x PF: the product of the two means, which rewards methods that do both (one of them at 0 gives 0).

Scenes of generated images come from `reader.AttributeReader.predict`; stated attributes usually from
`world.parse_caption`. This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ipadapter.tinyworld.world import ATTRIBUTES, Scene


def _check_names(names: Iterable[str], what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"{what} has unknown attributes {unknown}; expected names from {tuple(ATTRIBUTES)}")
    if not names:
        raise ValueError(f"{what} is empty; expected at least one of {tuple(ATTRIBUTES)}")
    return names


def concept_preservation(reference: Scene, generated: Scene, attributes: Iterable[str] | None = None) -> float:
    """Fraction of the reference's attributes that the generated scene has.

    Args:
        reference: scene of the image prompt.
        generated: scene read from the generated image.
        attributes: which attributes to compare; None compares all of `ATTRIBUTES`.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: if `attributes` is empty or names an unknown attribute.
    """
    names = _check_names(ATTRIBUTES if attributes is None else attributes, "attributes")
    return sum(getattr(reference, name) == getattr(generated, name) for name in names) / len(names)


def prompt_following(stated: Mapping[str, str], generated: Scene) -> float:
    """Fraction of the stated attributes that the generated scene has.

    Args:
        stated: attribute -> value the prompt asks for, e.g. from `parse_caption`.
        generated: scene read from the generated image.

    Returns:
        A value in [0, 1].

    Raises:
        ValueError: if `stated` is empty, names an unknown attribute or gives a value that attribute lacks.
    """
    names = _check_names(stated, "stated")
    for name in names:
        if stated[name] not in ATTRIBUTES[name]:
            raise ValueError(f"stated {name!r} must be one of {ATTRIBUTES[name]}; found {stated[name]!r}")
    return sum(getattr(generated, name) == stated[name] for name in names) / len(names)


@dataclass(frozen=True)
class BatchScores:
    """Means over a batch of generated images."""

    cp: float  # mean concept preservation over all samples
    pf: float | None  # mean prompt following over samples whose prompt states something; None if none does
    cp_x_pf: float | None  # cp * pf, the product of the two means (not the mean of per-sample products)
    cp_per_attribute: dict[str, float]  # attribute -> fraction of samples that keep the reference's value
    num_samples: int  # number of generated images
    num_with_prompt: int  # samples that entered pf


def score_batch(
    references: Sequence[Scene],
    generated: Sequence[Scene],
    stated: Sequence[Mapping[str, str]] | None = None,
    attributes: Iterable[str] | None = None,
) -> BatchScores:
    """Scores a batch: mean CP, mean PF and their product.

    Args:
        references: reference scene per sample (the image prompt).
        generated: scene read from each generated image.
        stated: per sample, the attributes its text prompt states; empty dicts (no text) are left out of PF.
            None: no sample has a text prompt.
        attributes: attributes CP compares; None compares all.

    Returns:
        The batch scores.

    Raises:
        ValueError: if the lists are empty or differ in length.
    """
    if not references:
        raise ValueError("references is empty; expected at least one sample")
    if len(generated) != len(references):
        raise ValueError(f"expected one generated scene per reference ({len(references)}); found {len(generated)}")
    if stated is not None and len(stated) != len(references):
        raise ValueError(f"expected one stated dict per reference ({len(references)}); found {len(stated)}")
    names = _check_names(ATTRIBUTES if attributes is None else attributes, "attributes")
    n = len(references)
    cp = sum(concept_preservation(r, g, names) for r, g in zip(references, generated)) / n
    per_attribute = {
        name: sum(getattr(r, name) == getattr(g, name) for r, g in zip(references, generated)) / n for name in names
    }
    pf_values = [prompt_following(s, g) for s, g in zip(stated or [], generated) if s]
    pf = sum(pf_values) / len(pf_values) if pf_values else None
    return BatchScores(
        cp=cp,
        pf=pf,
        cp_x_pf=None if pf is None else cp * pf,
        cp_per_attribute=per_attribute,
        num_samples=n,
        num_with_prompt=len(pf_values),
    )
