"""Image transforms of the published recipe (FNE_SPEC section 8), sized by the encoder.

Train: RandomResizedCrop(size, scale) bicubic, horizontal flip, RandAugment(ops, magnitude).
Eval: resize to size x size bicubic (no centre crop, so nothing of the scene is cut away).
Size and normalisation always come from the encoder (:class:`ImageConfig`), so the data
pipeline cannot disagree with the model. Every augmentation can be switched off; the
synthetic benchmark does, since a flip would turn "left" into "right".
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from fne_lightning.models.encoders import ImageConfig

_BICUBIC = T.InterpolationMode.BICUBIC


def build_transform(
    image: ImageConfig,
    train: bool,
    crop_scale: Sequence[float] | None = (0.5, 1.0),
    hflip: bool = True,
    randaugment: Sequence[int] | None = (2, 7),
) -> T.Compose:
    """Return a PIL -> normalised (3, size, size) tensor transform."""
    size = image.size
    steps: list = []
    if train and crop_scale is not None:
        steps.append(T.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=_BICUBIC))
    else:
        steps.append(T.Resize((size, size), interpolation=_BICUBIC))
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    if train and randaugment:
        num_ops, magnitude = randaugment
        steps.append(T.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude)))
    steps += [T.ToTensor(), T.Normalize(image.mean, image.std)]
    return T.Compose(steps)


def is_random(transform: T.Compose) -> bool:
    """Whether ``transform`` draws random numbers (then its outputs must not be cached)."""
    return any(isinstance(t, (T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment)) for t in transform.transforms)
