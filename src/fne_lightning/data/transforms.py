"""Image transforms of the published recipe (FNE_SPEC section 8), sized by the encoder.

Train: RandomResizedCrop(size, scale) bicubic, horizontal flip, RandAugment(ops, magnitude).
Eval: resize to size x size bicubic (no centre crop, so nothing of the scene is cut away).
Size and normalisation always come from the encoder
(:class:`~fne_lightning.models.encoders.ImageConfig`), so the data pipeline cannot disagree with
the model. Every augmentation can be switched off; the synthetic benchmark does, since a flip
would turn "left" into "right".
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
    """The transform of a split: PIL image -> normalised (3, size, size) tensor.

    Args:
        image: the encoder's size and normalisation.
        train: the training transform (random crop, flip, RandAugment as set below); False:
            the evaluation transform (a bicubic resize to size x size).
        crop_scale: the area range of ``RandomResizedCrop``; None: resize instead.
        hflip: random horizontal flips.
        randaugment: ``(num_ops, magnitude)`` of RandAugment; None: none.
    """
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
    """Whether ``transform`` draws random numbers (then its outputs must not be cached).

    Args:
        transform: a transform of :func:`build_transform`.
    """
    return any(isinstance(t, (T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment)) for t in transform.transforms)
