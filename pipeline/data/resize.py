"""Square crops at the training resolution, made the way guided-diffusion prepares its images.

ADM shrinks the short side with BOX filtering by exact halvings while it is still at least twice
the target (cheap, alias-free), then one BICUBIC resize brings the short side to the target, and
the centre square is cut out. Matching this keeps our 64x64 LSUN/FFHQ images comparable with the
paper's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side equals `image_size`, then take the centre square.

    :param image: a PIL image in the mode it should keep ("RGB" or "L").
    :param image_size: side of the output square, in pixels.
    :return: uint8 array (image_size, image_size) for "L", (image_size, image_size, C) otherwise.
    """
    # Halve with BOX while another halving still leaves the short side >= the target.
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)

    # One BICUBIC step to the target; PIL returns a copy when the size is already right.
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.BICUBIC)

    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]
