"""COCO keypoint annotations -> top-down instances (the official ViTPose
loader's rules), detector boxes, and the evaluation: COCO OKS AP through
pycocotools, OKS NMS and PCK, on small hand-made COCO files."""
import json
import sys

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from mae_jax.errors import DataError, MissingExtraError
from mae_jax.pose import coco, metrics
from mae_jax.pose.keypoints import OKS_SIGMAS

K = 17


def _pose(x0, y0, w, h, seed, labelled=K):
  """(K, 3) joints spread over the box (x0, y0, w, h); the first
  `labelled` are visible (v=2), the rest unlabelled zeros."""
  rng = np.random.default_rng(seed)
  kp = np.zeros((K, 3))
  kp[:labelled, 0] = x0 + rng.uniform(0.1, 0.9, labelled) * w
  kp[:labelled, 1] = y0 + rng.uniform(0.1, 0.9, labelled) * h
  kp[:labelled, 2] = 2
  return np.round(kp, 2)


def _ann(ann_id, image_id, bbox, kp, iscrowd=0, area=None):
  kp = np.asarray(kp)
  return {'id': ann_id, 'image_id': image_id, 'category_id': 1,
          'bbox': list(bbox), 'iscrowd': iscrowd,
          'area': float(bbox[2] * bbox[3] * 0.6) if area is None else area,
          'num_keypoints': int((kp[:, 2] > 0).sum()),
          'keypoints': [float(v) for v in kp.reshape(-1)]}


def _annotations():
  """Four images: people to keep, a crowd, a zero-keypoint person, a box
  partly left of the image, a zero-area one and a degenerate box."""
  images = [{'id': i, 'file_name': f'{i:012d}.jpg', 'width': 640,
             'height': 480} for i in (3, 1, 2, 4)]
  anns = [
      _ann(21, 2, (-30, 40, 150, 300), _pose(0, 40, 120, 300, 21)),  # clipped
      _ann(11, 1, (300, 50, 200, 400), _pose(300, 50, 200, 400, 11),
           iscrowd=1),
      _ann(10, 1, (100, 60, 160, 380), _pose(100, 60, 160, 380, 10)),
      _ann(12, 1, (400, 100, 120, 300), _pose(400, 100, 120, 300, 12, 9)),
      _ann(20, 2, (200, 80, 140, 350), np.zeros((K, 3))),  # no joints
      _ann(30, 3, (50, 50, 100, 200), _pose(50, 50, 100, 200, 30), area=0),
      _ann(31, 3, (500, 50, 0.5, 200), _pose(500, 50, 1, 200, 31)),
      _ann(32, 3, (250, 20, 180, 420), _pose(250, 20, 180, 420, 32)),
  ]
  return {'images': images, 'annotations': anns,
          'categories': [{'id': 1, 'name': 'person'}]}


@pytest.fixture
def ann_file(tmp_path):
  path = tmp_path / 'person_keypoints.json'
  path.write_text(json.dumps(_annotations()))
  return path


def _write(path, data):
  path.write_text(json.dumps(data))
  return path


def _perfect_results(shift=0.0):
  """COCO results: every annotation COCOeval scores (not crowd, labelled
  joints) as its own keypoints, moved `shift` pixels right and down."""
  out = []
  for a in _annotations()['annotations']:
    if a['iscrowd'] or a['num_keypoints'] == 0:
      continue
    kp = np.asarray(a['keypoints']).reshape(K, 3)
    kp[:, :2] += shift
    kp[:, 2] = 0.9
    out.append({'image_id': a['image_id'], 'category_id': 1,
                'keypoints': kp.reshape(-1).tolist(), 'score': 1.0})
  return out


def test_gt_instances_follow_the_official_rules(ann_file, tmp_path):
  instances = coco.load_gt_instances(ann_file, tmp_path / 'images')
  # crowd 11, joint-less 20, zero-area 30 and the 0.5 px wide 31 are
  # skipped; order is by image id, then annotation id.
  assert [(i.image_id, i.ann_id) for i in instances] == [
      (1, 10), (1, 12), (2, 21), (3, 32)]
  first = instances[0]
  assert first.file_name == str(tmp_path / 'images' / '000000000001.jpg')
  assert first.score == 1.0 and first.keypoints.shape == (K, 3)
  assert first.keypoints.dtype == first.box.dtype == np.float32
  # the official cleaning: x2 = min(W - 1, x1 + w - 1), width x2 - x1
  np.testing.assert_array_equal(first.box, [100, 60, 159, 379])
  np.testing.assert_array_equal(instances[2].box, [0, 40, 149, 299])
  raw = {a['id']: a for a in _annotations()['annotations']}
  np.testing.assert_allclose(instances[1].keypoints.reshape(-1),
                             raw[12]['keypoints'], rtol=1e-6)
  assert (instances[1].keypoints[9:] == 0).all()  # unlabelled joints kept 0
  assert instances[1].area == raw[12]['area']


def test_detections_keep_persons_above_the_score_threshold(ann_file,
                                                           tmp_path):
  dets = [{'image_id': 2, 'category_id': 1, 'bbox': [5, 6, 70, 80],
           'score': 0.3},
          {'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 30, 40],
           'score': 0.9},
          {'image_id': 1, 'category_id': 2, 'bbox': [1, 2, 30, 40],
           'score': 0.99},
          {'image_id': 1, 'category_id': 1, 'bbox': [-3, 2, 50, 60],
           'score': 0.05}]
  det_file = _write(tmp_path / 'dets.json', dets)
  every = coco.load_detections(det_file, ann_file, tmp_path)
  assert [(i.image_id, i.score) for i in every] == [
      (1, pytest.approx(0.9)), (1, pytest.approx(0.05)),
      (2, pytest.approx(0.3))]
  np.testing.assert_array_equal(every[1].box, [-3, 2, 50, 60])  # as given
  assert all((i.keypoints == 0).all() and i.keypoints.shape == (K, 3)
             and i.ann_id is None for i in every)
  assert every[2].file_name == str(tmp_path / '000000000002.jpg')
  kept = coco.load_detections(det_file, ann_file, tmp_path,
                              score_threshold=0.3)
  assert [i.score for i in kept] == [pytest.approx(0.9), pytest.approx(0.3)]


def test_malformed_files_raise_data_errors_naming_file_and_annotation(
    ann_file, tmp_path):
  with pytest.raises(DataError, match='missing.json: no such file'):
    coco.load_gt_instances(tmp_path / 'missing.json', tmp_path)
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": [')
  with pytest.raises(DataError, match='bad.json: not valid JSON'):
    coco.load_gt_instances(bad, tmp_path)
  with pytest.raises(DataError, match="no_images.json: the file has no "
                     "'images'"):
    coco.load_gt_instances(_write(tmp_path / 'no_images.json',
                                  {'annotations': []}), tmp_path)
  data = _annotations()
  del data['annotations'][2]['bbox']
  with pytest.raises(DataError, match="no_bbox.json: annotation 10 has no "
                     "'bbox'"):
    coco.load_gt_instances(_write(tmp_path / 'no_bbox.json', data), tmp_path)
  data = _annotations()
  data['annotations'][0]['keypoints'] = data['annotations'][0]['keypoints'][
      :48]
  with pytest.raises(DataError, match='short.json: annotation 21 has 48 '
                     'keypoint values, expected 3 \\* 17 = 51'):
    coco.load_gt_instances(_write(tmp_path / 'short.json', data), tmp_path)
  orphan = [{'image_id': 99, 'category_id': 1, 'bbox': [0, 0, 9, 9],
             'score': 1.0}]
  with pytest.raises(DataError, match='orphan.json: detection 0 refers to '
                     'image 99'):
    coco.load_detections(_write(tmp_path / 'orphan.json', orphan), ann_file,
                         tmp_path)
  with pytest.raises(DataError, match='dict.json: expected a list'):
    coco.load_detections(_write(tmp_path / 'dict.json', {}), ann_file,
                         tmp_path)
  data = _annotations()
  del data['annotations'][1]['num_keypoints']
  with pytest.raises(DataError, match="eval.json: annotation 11 has no "
                     "'num_keypoints'"):
    metrics.coco_keypoint_ap(_write(tmp_path / 'eval.json', data),
                             _perfect_results())


def test_perfect_keypoints_give_ap_one_quietly(ann_file, capsys):
  stats, text = metrics.coco_keypoint_ap(ann_file, _perfect_results(),
                                         return_text=True)
  assert set(stats) == set(metrics.STAT_NAMES)
  assert stats['AP'] == stats['AP50'] == stats['AP75'] == 1.0
  assert stats['AR'] == stats['APl'] == stats['ARl'] == 1.0
  assert stats['APm'] == -1.0  # no medium-sized person in the file
  assert 'Average Precision' in text and 'keypoints' in text
  assert capsys.readouterr().out == ''


def test_ap_falls_strictly_as_predictions_move_away(ann_file):
  aps = [metrics.coco_keypoint_ap(ann_file, _perfect_results(s))['AP']
         for s in (0, 4, 8, 16)]
  assert aps[0] == 1.0
  assert 1.0 > aps[1] > aps[2] > aps[3] > 0.0


def test_no_results_give_zero_ap(ann_file):
  stats = metrics.coco_keypoint_ap(ann_file, [])
  assert stats['AP'] == 0.0 and stats['AR'] == 0.0


def test_other_joint_counts_need_their_sigmas(tmp_path):
  kp = [[10, 20, 2], [30, 40, 2], [50, 60, 1]]
  data = {'images': [{'id': 1, 'file_name': 'a.jpg', 'width': 99,
                      'height': 99}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1,
                           'bbox': [5, 5, 60, 70], 'area': 3000.0,
                           'iscrowd': 0, 'num_keypoints': 3,
                           'keypoints': sum(kp, [])}],
          'categories': [{'id': 1, 'name': 'person'}]}
  path = _write(tmp_path / 'three.json', data)
  results = [{'image_id': 1, 'category_id': 1, 'score': 1.0,
              'keypoints': sum(kp, [])}]
  with pytest.raises(ValueError, match='3 joints need their OKS sigmas'):
    metrics.coco_keypoint_ap(path, results)
  stats = metrics.coco_keypoint_ap(path, results, sigmas=[0.05, 0.05, 0.08])
  assert stats['AP'] == pytest.approx(1.0)


def test_oks_matches_pycocotools_for_equal_areas():
  gt = _pose(0, 0, 100, 250, 0)
  dets = np.stack([gt + [[dx, -dx, 0]] for dx in (0.0, 3.0, 9.0)])
  ours = metrics.oks(gt, dets, 9000.0, np.full(3, 9000.0))
  ev = COCOeval(iouType='keypoints')
  np.testing.assert_allclose(ev.params.kpt_oks_sigmas, OKS_SIGMAS)
  ev.params.imgIds, ev.params.catIds = [1], [1]
  ev._gts = {(1, 1): [{'keypoints': gt.reshape(-1), 'area': 9000.0,
                       'bbox': [0, 0, 100, 250]}]}
  ev._dts = {(1, 1): [{'keypoints': d.reshape(-1), 'score': 1.0}
                      for d in dets]}
  theirs = ev.computeOks(1, 1)[:, 0]
  np.testing.assert_allclose(ours, theirs, rtol=1e-10)
  assert ours[0] == pytest.approx(1.0) and ours[0] > ours[1] > ours[2]


def test_oks_nms_drops_lower_scored_duplicates_per_image():
  pose = _pose(0, 0, 100, 200, 1)
  other = _pose(300, 0, 100, 200, 2)

  def result(image_id, kp, score):
    return {'image_id': image_id, 'keypoints': kp, 'score': score,
            'area': 100 * 200 * 1.25 ** 2}

  results = [result(1, pose + [[1, 1, 0]], 0.5),   # near-duplicate, lower
             result(1, pose, 0.8),
             result(1, other, 0.3),               # another person
             result(2, pose + [[1, 1, 0]], 0.2)]  # same pose, other image
  kept = metrics.oks_nms(results, threshold=0.9)
  assert kept == [results[1], results[2], results[3]]
  # at a threshold above their OKS the near-duplicate stays
  assert len(metrics.oks_nms(results, threshold=0.999999)) == 4


def test_pck_is_mmpose_mean_of_per_joint_accuracies():
  gt = np.zeros((2, 3, 3))
  gt[..., :2] = [[[10, 10], [20, 20], [30, 30]],
                 [[50, 50], [60, 60], [70, 70]]]
  gt[0, :, 2] = [2, 1, 0]   # joint 2 unlabelled in person 0
  gt[1, :, 2] = [2, 0, 0]   # only joint 0 labelled in person 1
  boxes = [[0, 0, 50, 100], [0, 0, 100, 40]]  # normalisers 100 and 100
  assert metrics.pck(gt[..., :2], gt, boxes) == 1.0
  pred = gt[..., :2].copy()
  pred[1, 0] += [0, 25]       # 0.25 > 0.2: wrong
  pred[0, 1] += [12, 16]      # 20 px = 0.2: not strictly closer, wrong
  pred[0, 2] += [500, 500]    # unlabelled: ignored
  # joint 0: 1 of 2 correct, joint 1: 0 of 1, joint 2 never labelled
  assert metrics.pck(pred, gt, boxes) == pytest.approx(0.25)
  pred[0, 1] = gt[0, 1, :2] + [11, 16]  # 19.4 px: correct
  assert metrics.pck(pred, gt, boxes) == pytest.approx(0.75)
  assert metrics.pck(pred, gt, boxes, threshold=0.3) == 1.0


def test_ap_without_pycocotools_names_the_pose_extra(ann_file, monkeypatch):
  monkeypatch.setitem(sys.modules, 'pycocotools', None)
  with pytest.raises(MissingExtraError,
                     match=r"pip install 'mae_jax\[pose\]'"):
    metrics.coco_keypoint_ap(ann_file, _perfect_results())
