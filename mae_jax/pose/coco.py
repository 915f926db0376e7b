"""COCO person keypoint annotations -> top-down instances (one per person).

Ground truth follows the loader of the official ViTPose code
(ViTAE-Transformer/ViTPose, mmpose's `TopDownCocoDataset`), which training
and ground-truth-box evaluation (`use_gt_bbox=True`) share:

- crowd annotations (`iscrowd` 1) are skipped;
- each box is cleaned against its image: x1 = max(0, x), y1 = max(0, y),
  x2 = min(width - 1, x1 + max(0, w - 1)), y2 likewise; the annotation is
  kept only when x2 > x1, y2 > y1 and its `area` (when given) is > 0, with
  the box (x1, y1, x2 - x1, y2 - y1);
- annotations without labelled joints (all keypoint values 0, or
  `num_keypoints` 0) are skipped.

Detector boxes (a COCO detection results file, e.g. the official
`COCO_val2017_detections_AP_H_56_person.json`) keep category 1 with
score >= a threshold (`det_bbox_thr`, 0 in the official COCO configs); their
boxes are used as they are.

Instances come in a fixed order: by image id, then annotation id (ground
truth) or position in the file (detections).
"""
import dataclasses
import json
import os

import numpy as np

from mae_jax import paths
from mae_jax.errors import DataError
from mae_jax.pose.keypoints import NUM_KEYPOINTS

PERSON_CATEGORY = 1


@dataclasses.dataclass
class Instance:
  """One person: the crop's box and, for ground truth, its joints.

  image_id: the COCO image id. file_name: path of the image file (the image
  folder joined with the image's `file_name`). box: (4,) float32 COCO
  (x, y, w, h) in pixels. keypoints: (K, 3) float32 (x, y, v), v the COCO
  label (0 not labelled, 1 occluded, 2 visible); zeros for detector boxes.
  score: 1 for ground truth, the detector's score for detections.
  ann_id: the annotation id (None for detections). area: the annotation's
  `area` (segment area, as COCO's OKS uses) or, when absent and for
  detections, the box area w * h.
  """
  image_id: int
  file_name: str
  box: np.ndarray
  keypoints: np.ndarray
  score: float = 1.0
  ann_id: int | None = None
  area: float = 0.0


def read_json(path):
  """The parsed JSON of `path`; DataError naming the file when it is
  missing or not JSON."""
  path = paths.resolve(path)
  shown = paths.shown(path)
  if not path.exists():
    raise DataError(f'{shown}: no such file')
  if path.is_dir():
    raise DataError(f'{shown}: is a directory, not a JSON file')
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f'{shown}: not valid JSON ({e})') from None


def _check_keys(entry, keys, shown, what):
  if not isinstance(entry, dict):
    raise DataError(f'{shown}: {what} is not a JSON object')
  missing = [k for k in keys if k not in entry]
  if missing:
    raise DataError(f'{shown}: {what} has no {", ".join(map(repr, missing))}')


def _images(data, shown, keys):
  """{image id: image entry} of a COCO annotation dict."""
  _check_keys(data, ('images',), shown, 'the file')
  images = {}
  for image in data['images']:
    _check_keys(image, ('id',), shown, 'an image entry')
    _check_keys(image, keys, shown, f'image {image["id"]}')
    images[image['id']] = image
  return images


def _keypoints(ann, num_keypoints, shown):
  """(K, 3) float32 of annotation `ann`; DataError unless 3 * K numbers."""
  values = ann['keypoints']
  try:
    kp = np.asarray(values, np.float32)
  except (TypeError, ValueError):
    kp = None
  if kp is None or kp.shape != (3 * num_keypoints,):
    size = len(values) if isinstance(values, list) else type(values).__name__
    raise DataError(f'{shown}: annotation {ann["id"]} has {size} keypoint '
                    f'values, expected 3 * {num_keypoints} = '
                    f'{3 * num_keypoints}')
  return kp.reshape(num_keypoints, 3)


def _clean_box(box, width, height):
  """The official box cleaning: (x, y, w, h) clipped to the image, or None
  when nothing of it is left."""
  x, y, w, h = (float(v) for v in box)
  x1, y1 = max(0.0, x), max(0.0, y)
  x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
  y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
  if x2 > x1 and y2 > y1:
    return np.array([x1, y1, x2 - x1, y2 - y1], np.float32)
  return None


def load_gt_instances(annotation_json, image_dir,
                      num_keypoints=NUM_KEYPOINTS):
  """The ground-truth person instances of a COCO keypoint annotation file
  (`person_keypoints_*.json`) by the official rules (module docstring),
  as a list of Instance with score 1. The official code loads the same
  instances for training and for evaluation with ground-truth boxes
  (`use_gt_bbox=True`).
  """
  data = read_json(annotation_json)
  shown = paths.shown(paths.resolve(annotation_json))
  images = _images(data, shown, ('file_name', 'width', 'height'))
  _check_keys(data, ('annotations',), shown, 'the file')
  image_dir = paths.resolve(image_dir)
  instances = []
  for ann in data['annotations']:
    _check_keys(ann, ('id',), shown, 'an annotation')
    _check_keys(ann, ('image_id', 'bbox', 'keypoints'), shown,
                f'annotation {ann["id"]}')
    image = images.get(ann['image_id'])
    if image is None:
      raise DataError(f'{shown}: annotation {ann["id"]} refers to image '
                      f'{ann["image_id"]}, which is not in "images"')
    keypoints = _keypoints(ann, num_keypoints, shown)
    if len(ann['bbox']) != 4:
      raise DataError(f'{shown}: annotation {ann["id"]} has a bbox of '
                      f'{len(ann["bbox"])} values, expected 4 (x, y, w, h)')
    if ann.get('iscrowd', 0):
      continue
    box = _clean_box(ann['bbox'], image['width'], image['height'])
    if box is None or ('area' in ann and not ann['area'] > 0):
      continue
    if not keypoints.any() or ann.get('num_keypoints', 1) == 0:
      continue
    area = float(ann['area']) if 'area' in ann else float(box[2] * box[3])
    instances.append(Instance(
        image_id=ann['image_id'],
        file_name=os.fspath(image_dir / image['file_name']),
        box=box, keypoints=keypoints, score=1.0, ann_id=ann['id'],
        area=area))
  instances.sort(key=lambda inst: (inst.image_id, inst.ann_id))
  return instances


def load_detections(detections_json, annotation_json, image_dir,
                    score_threshold=0.0, num_keypoints=NUM_KEYPOINTS):
  """Person boxes of a COCO detection results file (a list of
  {image_id, category_id, bbox, score}): category 1 with score >=
  `score_threshold`, as Instances with zero keypoints and the detector's
  score; image file names come from the annotation file."""
  detections = read_json(detections_json)
  shown = paths.shown(paths.resolve(detections_json))
  if not isinstance(detections, list):
    raise DataError(f'{shown}: expected a list of detections, '
                    f'found a JSON {type(detections).__name__}')
  if not detections:
    raise DataError(f'{shown}: holds no detections')
  shown_ann = paths.shown(paths.resolve(annotation_json))
  images = _images(read_json(annotation_json), shown_ann, ('file_name',))
  image_dir = paths.resolve(image_dir)
  instances = []
  for i, det in enumerate(detections):
    _check_keys(det, ('image_id', 'category_id', 'bbox', 'score'), shown,
                f'detection {i}')
    if det['category_id'] != PERSON_CATEGORY or det['score'] < score_threshold:
      continue
    image = images.get(det['image_id'])
    if image is None:
      raise DataError(f'{shown}: detection {i} refers to image '
                      f'{det["image_id"]}, which {shown_ann} does not list')
    if len(det['bbox']) != 4:
      raise DataError(f'{shown}: detection {i} has a bbox of '
                      f'{len(det["bbox"])} values, expected 4 (x, y, w, h)')
    box = np.asarray(det['bbox'], np.float32)
    instances.append(Instance(
        image_id=det['image_id'],
        file_name=os.fspath(image_dir / image['file_name']),
        box=box, keypoints=np.zeros((num_keypoints, 3), np.float32),
        score=float(det['score']), area=float(box[2] * box[3])))
  instances.sort(key=lambda inst: inst.image_id)  # stable: file order kept
  return instances
