"""som.py with COCO input (issue 31, item 8) and its command line's errors on bad masks (issue 32, item 13)."""
import json

import numpy as np
import pytest
from PIL import Image

import som
from test_som import encode_rle

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


def run(tmp_path, masks, *flags, image="000000397133.png"):
    """som.py's command line on one 64x48 grey image; returns the written image (or raises its SystemExit)."""
    Image.new("RGB", (64, 48), (128, 128, 128)).save(tmp_path / image)
    (tmp_path / "m.json").write_text(json.dumps(masks), encoding="utf-8")
    som.main([str(tmp_path / image), "--masks", str(tmp_path / "m.json"), "--out", str(tmp_path / "out"), *flags])
    return np.array(Image.open(tmp_path / "out" / image))


def marked(instances):
    return np.array(som.render_som(Image.new("RGB", (64, 48), (128, 128, 128)), instances))


def test_coco_results_list_marks_its_image_by_descending_score(tmp_path, capsys):
    """IDs 1..N go to the detections of 000000397133.png (id 397133) by descending score, those below 0.5 left out."""
    rle = encode_rle(som.instance_mask([30, 4, 60, 40], (64, 48)))
    results = [{"image_id": 397133, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.7},
               {"image_id": 5, "category_id": 1, "bbox": [0, 0, 64, 48], "score": 0.99},  # another image
               {"image_id": 397133, "category_id": 3, "segmentation": rle, "bbox": [30, 4, 30, 36], "score": 0.9},
               {"image_id": 397133, "category_id": 2, "bbox": [10, 30, 14, 14], "score": 0.3}]
    out = run(tmp_path, results)
    assert "000000397133.png: 2 marks" in capsys.readouterr().out
    assert np.array_equal(out, marked({1: rle, 2: {"bbox": [2, 2, 20, 20]}}))
    out = run(tmp_path, results, "--min-score", "0.2")
    assert np.array_equal(out, marked({1: rle, 2: {"bbox": [2, 2, 20, 20]}, 3: {"bbox": [10, 30, 14, 14]}}))


def test_coco_instances_file_marks_in_file_order(tmp_path):
    """An instances file: polygons and iscrowd's uncompressed RLE (counts as a list), IDs in file order."""
    crowd = som.instance_mask([40, 20, 60, 44], (64, 48))
    flat = crowd.T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    crowd_rle = {"size": [48, 64], "counts": np.diff(bounds).tolist()}  # starts with a run of 0s
    polygon = [[4, 4, 30, 4, 30, 30, 4, 30]]
    instances = {"images": [{"id": 7, "file_name": "street.png", "height": 48, "width": 64}],
                 "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle,
                                  "bbox": [40, 20, 20, 24]},
                                 {"id": 2, "image_id": 8, "category_id": 1, "iscrowd": 0, "segmentation": polygon},
                                 {"id": 3, "image_id": 7, "category_id": 2, "iscrowd": 0, "segmentation": polygon,
                                  "bbox": [4, 4, 26, 26]}],
                 "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}
    out = run(tmp_path, instances, "--image-id", "7", image="street.png")
    assert np.array_equal(out, marked({1: crowd, 2: polygon}))


def test_coco_without_a_record_for_the_image_is_an_error_naming_the_flags(tmp_path):
    results = [{"image_id": 5, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9}]
    with pytest.raises(SystemExit, match=r"m.json: 000000397133.png: no record of image_id 397133 .*--image-id"):
        run(tmp_path, results)
    assert not (tmp_path / "out" / "000000397133.png").exists()  # no frame written without its marks
    assert run(tmp_path, results, "--image-id", "5").shape == (48, 64, 3)


CORRUPT_RLE = {"size": [48, 64], "counts": encode_rle(np.ones((48, 64), bool))["counts"][:-1] + "7"}


@pytest.mark.parametrize("masks, says", [
    ([[2, 2, 20, 20], [30, 4, 60, 40]],  # a list of boxes: not a COCO results list
     r"m.json: 000000397133.png: record 0: not a COCO result \(needs image_id, segmentation or bbox\)"),
    ({"3": CORRUPT_RLE}, r"m.json: 000000397133.png: instance 3: bad RLE .*corrupt.*encode the mask again"),
    ({"⑦": [2, 2, 20, 20]}, r"m.json: 000000397133.png: instance ⑦: not a number .*write the ID in digits 0-9"),
])
def test_command_line_bad_masks_name_the_file_the_record_and_the_fix(tmp_path, masks, says):
    with pytest.raises(SystemExit, match=says):
        run(tmp_path, masks)
    assert not (tmp_path / "out" / "000000397133.png").exists()
    assert som.natural_key("frame⑦_2.jpg") == ["frame⑦_", 2, ".jpg"]  # a frame name with "⑦" still sorts
