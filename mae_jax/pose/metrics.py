"""Evaluation of top-down pose: COCO OKS AP/AR, OKS NMS and PCK.

As the official ViTPose COCO evaluation does (ViTAE-Transformer/ViTPose,
mmpose's `TopDownCocoDataset.evaluate` with the data config of
`ViTPose_base_coco_256x192.py`: `use_nms` left at its default True,
`soft_nms=False`, `oks_thr=0.9`, `vis_thr=0.2`):

1. each person is rescored: its box score times the mean score of its
   joints above 0.2 (`mae_jax.pose.estimate.pose_score`);
2. per image, `oks_nms` with threshold 0.9 drops a person whose OKS with a
   higher-scoring kept one exceeds 0.9 (the config's `nms_thr` is for box
   NMS and plays no part);
3. `coco_keypoint_ap` runs pycocotools' COCOeval with iouType 'keypoints'
   (extra `pose`).

`pck` is mmpose's top-down PCK (`keypoint_pck_accuracy` with bounding-box
normalisation).
"""
import contextlib
import io

import numpy as np

from mae_jax import extras, paths
from mae_jax.errors import DataError
from mae_jax.pose import coco as coco_lib
from mae_jax.pose.keypoints import NUM_KEYPOINTS, OKS_SIGMAS

OKS_NMS_THRESHOLD = 0.9   # oks_thr of the official COCO configs
PCK_THRESHOLD = 0.2       # mmpose's top-down PCK threshold
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl',
              'AR', 'AR50', 'AR75', 'ARm', 'ARl')  # COCOeval.stats order
_GT_KEYS = ('image_id', 'category_id', 'keypoints', 'num_keypoints', 'area',
            'bbox', 'iscrowd')
_RESULT_KEYS = ('image_id', 'category_id', 'keypoints', 'score')


def _sigmas(num_keypoints, sigmas):
  """The OKS sigmas as a float64 (K,) array: COCO's for 17 joints when
  `sigmas` is None."""
  if sigmas is None:
    if num_keypoints != NUM_KEYPOINTS:
      raise ValueError(f'{num_keypoints} joints need their OKS sigmas '
                       f'(the defaults are the {NUM_KEYPOINTS} COCO joints)')
    sigmas = OKS_SIGMAS
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.shape != (num_keypoints,):
    raise ValueError(f'{sigmas.size} OKS sigmas for {num_keypoints} joints')
  return sigmas


def oks(keypoints, others, area, other_areas, sigmas=None):
  """Object keypoint similarity of one pose with each of `others`, as the
  official OKS NMS computes it: every joint counts, the scale is the mean
  of the two areas. keypoints: (K, 2+); others: (N, K, 2+); area: float;
  other_areas: (N,). Returns (N,) float64."""
  xy = np.asarray(keypoints, np.float64)[:, :2]
  others = np.asarray(others, np.float64)[..., :2].reshape(-1, *xy.shape)
  variances = (2 * _sigmas(xy.shape[0], sigmas)) ** 2
  sq_dist = ((others - xy) ** 2).sum(-1)
  scale = (area + np.asarray(other_areas, np.float64))[:, None] / 2
  e = sq_dist / variances / (scale + np.spacing(1)) / 2
  return np.exp(-e).mean(-1)


def oks_nms(results, threshold=OKS_NMS_THRESHOLD, sigmas=None):
  """Greedy OKS non-maximum suppression within each image.

  results: dicts with 'image_id', 'keypoints' ((K, 3) or flat 3K: x, y,
  score), 'score' and 'area' (the official code uses the area of the
  person's crop region, w * h of its scale in pixels, i.e.
  prod(scale * 200)). Highest score first, a person is dropped when its OKS
  with one already kept exceeds `threshold`. Returns the kept dicts in
  their input order.
  """
  by_image = {}
  for i, r in enumerate(results):
    by_image.setdefault(r['image_id'], []).append(i)
  kept = []
  for indices in by_image.values():
    kps = np.stack([np.asarray(results[i]['keypoints'], np.float64)
                    .reshape(-1, 3) for i in indices])
    areas = np.array([results[i]['area'] for i in indices], np.float64)
    scores = np.array([results[i]['score'] for i in indices], np.float64)
    order = list(np.argsort(-scores, kind='stable'))
    while order:
      best, rest = order[0], np.array(order[1:], int)
      kept.append(indices[best])
      if not rest.size:
        break
      similarity = oks(kps[best], kps[rest], areas[best], areas[rest], sigmas)
      order = list(rest[similarity <= threshold])
  return [results[i] for i in sorted(kept)]


def _gt_dataset(annotation_json):
  """The annotation file's dict, checked for what COCOeval reads."""
  data = coco_lib.read_json(annotation_json)
  shown = paths.shown(paths.resolve(annotation_json))
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(data, dict) or key not in data:
      raise DataError(f'{shown}: the file has no {key!r}')
  for ann in data['annotations']:
    if 'id' not in ann:
      raise DataError(f'{shown}: an annotation has no \'id\'')
    missing = [k for k in _GT_KEYS if k not in ann]
    if missing:
      raise DataError(f'{shown}: annotation {ann["id"]} has no '
                      f'{", ".join(map(repr, missing))}')
  return data


def _results(results, image_ids, num_keypoints):
  """COCO keypoint results reduced to the four fields COCOeval reads (a
  'bbox' field would make pycocotools take them for box results)."""
  out = []
  for i, r in enumerate(results):
    missing = [k for k in _RESULT_KEYS if k not in r]
    if missing:
      raise ValueError(f'result {i} has no {", ".join(map(repr, missing))}')
    kp = np.asarray(r['keypoints'], np.float64).reshape(-1)
    if kp.size != 3 * num_keypoints:
      raise ValueError(f'result {i} has {kp.size} keypoint values, expected '
                       f'3 * {num_keypoints} as in the annotations')
    if r['image_id'] not in image_ids:
      raise ValueError(f'result {i} is for image {r["image_id"]}, which the '
                       'annotation file does not list')
    out.append({'image_id': r['image_id'], 'category_id': r['category_id'],
                'keypoints': [float(v) for v in kp],
                'score': float(r['score'])})
  return out


def coco_keypoint_ap(annotation_json, results, sigmas=None,
                     return_text=False):
  """COCO keypoint AP/AR of `results` against a keypoint annotation file.

  results: COCO keypoint results (dicts with image_id, category_id,
  keypoints [x1, y1, s1, ...], score), e.g. `estimate.coco_results`.
  sigmas: per-joint OKS sigmas, COCO's (`keypoints.OKS_SIGMAS`) by default
  and required for other joint counts. Returns {name: float} for
  STAT_NAMES (COCOeval 'keypoints' stats: OKS AP averaged over thresholds
  0.50:0.95, at 0.5 and 0.75, medium and large people, then the same for
  AR; -1 where the annotations hold no person of that size); all 0 for
  no results. With return_text, also returns pycocotools' printed
  summary.
  """
  extras.require('pycocotools', 'pose', 'COCO keypoint AP')
  # pylint: disable-next=import-outside-toplevel
  from pycocotools import coco, cocoeval

  data = _gt_dataset(annotation_json)
  lengths = {len(a['keypoints']) for a in data['annotations']} or {
      3 * NUM_KEYPOINTS}
  if len(lengths) > 1:
    shown = paths.shown(paths.resolve(annotation_json))
    raise DataError(f'{shown}: annotations have keypoint lists of different '
                    f'lengths {sorted(lengths)}')
  num_keypoints = lengths.pop() // 3
  sigmas = _sigmas(num_keypoints, sigmas)
  results = _results(results, {im['id'] for im in data['images']},
                     num_keypoints)
  if not results:
    stats = {name: 0.0 for name in STAT_NAMES}
    return (stats, 'no results: AP and AR are 0\n') if return_text else stats

  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    gt = coco.COCO()
    gt.dataset = data
    gt.createIndex()
    evaluation = cocoeval.COCOeval(gt, gt.loadRes(results), 'keypoints')
    evaluation.params.kpt_oks_sigmas = sigmas
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluation.stats)}
  return (stats, text.getvalue()) if return_text else stats


def pck(pred_xy, gt_keypoints, boxes, threshold=PCK_THRESHOLD):
  """Fraction of correct keypoints (PCK) as mmpose's top-down PCK.

  A labelled joint (v > 0) is correct when its predicted position lies
  closer than threshold * max(box w, box h) to the ground truth (the box
  is the person's ground-truth box; people with an empty box are left
  out). The result is the mean over joints of each joint's fraction of
  correct people, over the joints labelled at least once (mmpose's
  `keypoint_pck_accuracy` average), 0 when none is labelled.

  pred_xy: (N, K, 2+) predicted x, y (further columns ignored);
  gt_keypoints: (N, K, 3) x, y, v; boxes: (N, 4) COCO x, y, w, h.
  """
  pred = np.asarray(pred_xy, np.float64)[..., :2]
  gt = np.asarray(gt_keypoints, np.float64)
  size = np.asarray(boxes, np.float64).reshape(-1, 4)[:, 2:].max(-1)
  labelled = (gt[..., 2] > 0) & (size > 0)[:, None]
  safe = np.where(size > 0, size, 1.0)[:, None]
  correct = (np.linalg.norm(pred - gt[..., :2], axis=-1) / safe) < threshold
  counts = labelled.sum(0)
  if not counts.any():
    return 0.0
  per_joint = (correct & labelled).sum(0)[counts > 0] / counts[counts > 0]
  return float(per_joint.mean())
