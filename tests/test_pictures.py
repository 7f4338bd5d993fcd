"""One orientation rule for every picture: a 2D image as its PNG file shows it, a 3D volume's mid-slices with the
first remaining axis to the right and the second upwards."""

import numpy as np
import torch
from PIL import Image

from monai_diffusion.pictures import image_panel, mid_slice, orthogonal_slices, picture_grid, planes, write_picture
from monai_diffusion.sampling import write_sample


def _bright(shape, at):
    x = torch.zeros(1, *shape)
    x[(0, *at)] = 1.0
    return x


def _where(image) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(np.asarray(image))), np.asarray(image).shape)
    return int(row), int(col)


def test_3d_mid_slices_put_the_first_axis_right_and_the_second_up():
    shape = (6, 5, 4)
    volume = _bright(shape, (4, 1, 2))[0]  # x = 4, y = 1, on the axial mid-slice z = 2
    axial = mid_slice(volume, 2)
    assert tuple(axial.shape) == (5, 6)  # rows along y, columns along x
    assert _where(axial) == (5 - 1 - 1, 4)  # y = 1 is the second row from the bottom
    names = list(planes(volume))
    assert names == ["sagittal", "coronal", "axial"]
    assert _where(image_panel(volume[None])) == _where(axial)  # grids and strips show the axial mid-slice


def test_every_picture_of_a_2d_image_looks_like_its_png(tmp_path):
    image = _bright((7, 5), (6, 1))  # (C, X, Y): x = 6, y = 1
    written = write_sample(image, tmp_path / "s", None, "png")
    with Image.open(written[0]) as png:
        expected = _where(png)
    assert expected == (1, 6)  # row y, column x, as the file is read back width first
    assert _where(orthogonal_slices([image[None]])["image"][0]) == expected
    assert _where(image_panel(image)) == expected
    grid = np.asarray(Image.open(write_picture(image[None], tmp_path / "grid.png")))
    assert _where(grid) == expected
    picture = np.asarray(picture_grid([("real", image[None])], (0.0, 1.0)))
    zoom = -(-96 // 5)  # panels of height 5 are enlarged to at least 96 pixels
    tile = picture[20: 20 + 5 * zoom, 120: 120 + 7 * zoom]  # below the 16-pixel header and a 4-pixel gap
    assert _where(tile[::zoom, ::zoom]) == expected
