"""som.py with COCO input (issue 31, item 8) and its command line's errors on bad masks (issue 32, item 13)."""
import numpy as np
import pytest

import som

# pycocotools 2.0.11 on an image h=30, w=50: M.decode(M.frPyObjects(np.array([bbox], dtype=float), 30, 50)), its
# box mask as (rows start, rows end, columns start, columns end); every one of them is a full rectangle.
PYCOCOTOOLS_BOXES = [
    ([10.3, 2.5, 7.45, 3.3], (3, 6, 10, 18)),   # rounding outward gave rows 2..6: 8 pixels too many
    ([2.3, 4.1, 6.0, 5.0], (4, 9, 2, 8)),       # rounding outward gave 4..10 x 2..9
    ([3.25, 3.25, 0.5, 0.5], (3, 4, 3, 4)),     # half a pixel holding one pixel centre
    ([0.1, 0.1, 0.2, 0.2], None),               # no pixel centre inside: empty
    ([45.5, 27.5, 10, 10], (28, 30, 46, 50)),   # past the image edge: clipped
    ([-2.3, -1.1, 5, 4], (0, 3, 0, 3)),         # before the image edge: clipped
    ([12.7, 20.1, -4.4, -3.5], (17, 20, 8, 13)),  # negative width and height: the box on the other side
]


@pytest.mark.parametrize("bbox, rect", PYCOCOTOOLS_BOXES)
def test_coco_bbox_mask_equals_pycocotools(bbox, rect):
    expected = np.zeros((30, 50), bool)
    if rect:
        expected[rect[0]:rect[1], rect[2]:rect[3]] = True
    assert np.array_equal(som.instance_mask({"bbox": bbox}, (50, 30)), expected)


def test_our_own_box_still_rounds_outward():
    """Only COCO's [x, y, w, h] changed: [x0, y0, x1, y1] boxes (the demo's) cover every pixel they touch."""
    mask = som.instance_mask({"box": [10.3, 2.5, 17.75, 5.8]}, (50, 30))
    assert mask.sum() == 4 * 8 and mask[2, 10] and mask[5, 17]
