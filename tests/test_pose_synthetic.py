"""The synthetic COCO keypoint set: deterministic files, valid COCO, labels
that match the drawings, and a cache that is written once and atomically."""
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from mae_jax.errors import ConfigError
from mae_jax.pose import keypoints, synthetic

SMALL = {'train': 10, 'val': 4}


def _files(root):
  """{relative path: bytes} of every file below root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = open(path, 'rb').read()
  return out


@pytest.fixture(name='photos', scope='module')
def _photos():
  return synthetic.load_backgrounds()


def test_same_seed_writes_identical_files_other_seed_differs(tmp_path):
  one = synthetic.ensure(tmp_path / 'a', seed=3, sizes=SMALL)
  synthetic.ensure(tmp_path / 'b', seed=3, sizes=SMALL)
  synthetic.ensure(tmp_path / 'c', seed=4, sizes=SMALL)
  a, b, c = (_files(tmp_path / n) for n in 'abc')
  assert len(a) == 1 + 2 + sum(SMALL.values())   # manifest, 2 JSON, images
  assert a == b
  assert sorted(a) == sorted(c)
  assert all(a[k] != c[k] for k in a if k.endswith('.jpg'))
  assert sorted(one) == ['train', 'val']
  ann, images = one['val']
  assert ann.name == 'person_keypoints_val.json'
  assert sorted(p.name for p in images.iterdir()) == [
      f'{i:07d}.jpg' for i in range(1_000_000, 1_000_004)]


def test_ground_truth_as_predictions_scores_ap_one(tmp_path):
  COCO = pytest.importorskip('pycocotools.coco').COCO
  COCOeval = pytest.importorskip('pycocotools.cocoeval').COCOeval
  ann, _ = synthetic.ensure(tmp_path, sizes={'train': 0, 'val': 30})['val']
  gt = COCO(os.fspath(ann))
  assert gt.loadCats(1)[0]['keypoints'] == list(keypoints.KEYPOINT_NAMES)
  results = [{'image_id': a['image_id'], 'category_id': 1, 'score': 1.0,
              'keypoints': a['keypoints']} for a in gt.loadAnns(gt.getAnnIds())]
  evaluation = COCOeval(gt, gt.loadRes(results), 'keypoints')
  evaluation.evaluate()
  evaluation.accumulate()
  evaluation.summarize()
  assert evaluation.stats[0] == 1.0     # AP
  assert evaluation.stats[5] == 1.0     # AR
  # A shifted copy of the predictions must score lower: the check can fail.
  for r in results:
    r['keypoints'] = [v + 4 if i % 3 < 2 else v
                      for i, v in enumerate(r['keypoints'])]
  shifted = COCOeval(gt, gt.loadRes(results), 'keypoints')
  shifted.evaluate()
  shifted.accumulate()
  shifted.summarize()
  assert shifted.stats[0] < 0.9


def _dot_offset(image, kps, x, y, colour):
  """Distance from (x, y) to the centroid of the pixels of `colour` within
  4 px, or NaN where another labelled joint is within 8 px."""
  labelled = kps[kps[:, 2] > 0, :2]
  if (np.hypot(*(labelled - [x, y]).T) < 8).sum() > 1:
    return np.nan
  c, r = math.floor(x + 0.5), math.floor(y + 0.5)
  x0, y0 = max(0, c - 4), max(0, r - 4)
  rows, cols = np.nonzero((image[y0:r + 5, x0:c + 5] == colour).all(-1))
  return math.hypot(cols.mean() + x0 - x, rows.mean() + y0 - y)


def test_visible_joints_show_their_dot_and_labels_follow_coco(photos):
  counts = np.zeros(3, int)
  two_people, heights, errors = 0, [], []
  for index in range(40):
    image, people = synthetic.render(0, index, photos)
    h, w = image.shape[:2]
    assert w in synthetic.IMAGE_WIDTHS and h in synthetic.IMAGE_HEIGHTS
    two_people += len(people) == 2
    for person in people:
      kps = person['keypoints']
      counts += np.bincount(kps[:, 2].astype(int), minlength=3)
      for x, y, v in kps:
        if v == 0:
          assert x == y == 0
          continue
        assert 0 <= x <= w - 1 and 0 <= y <= h - 1
        if v == 2:
          pixel = image[math.floor(y + 0.5), math.floor(x + 0.5)]
          assert tuple(pixel) == person['dot_colour'], (index, x, y)
          errors.append(_dot_offset(image, kps, x, y, person['dot_colour']))
      bx, by, bw, bh = person['bbox']
      assert 0 <= bx and bx + bw <= w - 1 + 1e-9
      assert 0 <= by and by + bh <= h - 1 + 1e-9
      labelled = kps[kps[:, 2] > 0]
      assert len(labelled) >= synthetic.MIN_LABELLED
      assert (labelled[:, 0] >= bx).all()
      assert (labelled[:, 0] <= bx + bw + 1e-9).all()
      assert (labelled[:, 1] >= by).all()
      assert (labelled[:, 1] <= by + bh + 1e-9).all()
      heights.append(bh / h)
  # Dots are centred on their labels (up to whole-pixel quantisation).
  assert np.nanmedian(errors) < 0.6
  # The sample shows every kind of label and some two-person images.
  assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0.6 * counts.sum()
  assert 0 < two_people < 40
  assert 0.35 < np.median(heights) < 0.95


def test_files_hold_the_rendered_images_and_their_labels(tmp_path, photos):
  ann, images = synthetic.ensure(tmp_path, seed=5, sizes=SMALL)['train']
  coco = json.loads(ann.read_text())
  assert coco['categories'] == [synthetic.category()]
  assert coco['categories'][0]['skeleton'][0] == [16, 14]     # 1-based
  by_image = {}
  for a in coco['annotations']:
    by_image.setdefault(a['image_id'], []).append(a)
    assert a['num_keypoints'] == sum(v > 0 for v in a['keypoints'][2::3])
    assert a['area'] == pytest.approx(
        synthetic.AREA_PER_BOX * a['bbox'][2] * a['bbox'][3], abs=0.01)
  assert len({a['id'] for a in coco['annotations']}) == len(
      coco['annotations'])
  for entry in coco['images']:
    image, people = synthetic.render(5, entry['id'], photos)
    assert image.shape == (entry['height'], entry['width'], 3)
    jpeg = io.BytesIO()
    Image.fromarray(image).save(jpeg, 'JPEG', quality=synthetic.JPEG_QUALITY)
    assert (images / entry['file_name']).read_bytes() == jpeg.getvalue()
    stored_people = by_image[entry['id']]
    assert len(stored_people) == len(people)
    for a, person in zip(stored_people, people):
      np.testing.assert_allclose(np.reshape(a['keypoints'], (17, 3)),
                                 person['keypoints'], atol=0.005)
      assert a['bbox'] == person['bbox']


def test_splits_are_disjoint_and_val_ignores_train_size(tmp_path):
  small = synthetic.ensure(tmp_path / 'a', sizes=SMALL)
  other = synthetic.ensure(tmp_path / 'b', sizes={'train': 3, 'val': 4})
  ids = {}
  for split, (ann, _) in small.items():
    ids[split] = {i['id'] for i in json.loads(ann.read_text())['images']}
  assert len(ids['train']) == SMALL['train'] and len(ids['val']) == 4
  assert not ids['train'] & ids['val']
  assert small['val'][0].read_bytes() == other['val'][0].read_bytes()
  assert _files(small['val'][1]) == _files(other['val'][1])


def test_second_call_reuses_the_files(tmp_path):
  first = synthetic.ensure(tmp_path, sizes=SMALL)
  stamps = {p: os.stat(p).st_mtime_ns for p in _paths(tmp_path)}
  assert synthetic.ensure(tmp_path, sizes=SMALL) == first
  assert {p: os.stat(p).st_mtime_ns for p in _paths(tmp_path)} == stamps


def _paths(root):
  return [os.path.join(f, n) for f, _, names in os.walk(root) for n in names]


def test_folder_without_manifest_is_rebuilt(tmp_path):
  root = tmp_path / 'set'
  (root / 'train').mkdir(parents=True)
  (root / 'train' / '0000000.jpg').write_bytes(b'half written')
  synthetic.ensure(root, sizes=SMALL)
  assert (root / synthetic.MANIFEST).exists()
  assert Image.open(root / 'train' / '0000000.jpg').size[0] > 0
  synthetic.ensure(tmp_path / 'ref', sizes=SMALL)
  assert _files(root) == _files(tmp_path / 'ref')
  assert sorted(os.listdir(tmp_path)) == ['ref', 'set']   # no temp left


def test_folder_with_other_files_is_left_alone(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match='exists and is not a synthetic pose'):
    synthetic.ensure(tmp_path, sizes=SMALL)
  assert os.listdir(tmp_path) == ['notes.txt']


def test_concurrent_writer_keeps_the_first_complete_set(tmp_path,
                                                        monkeypatch):
  root = tmp_path / 'set'
  load = synthetic.load_backgrounds
  calls = []

  def racing_load():
    # While this writer builds, another one finishes the same set first.
    calls.append(1)
    if len(calls) == 1:
      synthetic.ensure(root, sizes=SMALL)
    return load()

  monkeypatch.setattr(synthetic, 'load_backgrounds', racing_load)
  synthetic.ensure(root, sizes=SMALL)
  assert len(calls) == 2
  monkeypatch.setattr(synthetic, 'load_backgrounds', load)
  synthetic.ensure(tmp_path / 'ref', sizes=SMALL)
  assert _files(root) == _files(tmp_path / 'ref')
  assert sorted(os.listdir(tmp_path)) == ['ref', 'set']


def test_folder_with_another_set_is_refused(tmp_path):
  synthetic.ensure(tmp_path, seed=0, sizes=SMALL)
  with pytest.raises(ConfigError, match='holds another synthetic pose set'):
    synthetic.ensure(tmp_path, seed=1, sizes=SMALL)
  with pytest.raises(ConfigError, match="unknown synthetic pose split 'test'"):
    synthetic.ensure(tmp_path / 'x', sizes={'test': 1})


def test_default_root_is_in_the_cache_folder_and_used_without_root(
    tmp_path, monkeypatch):
  monkeypatch.setenv('MAE_JAX_CACHE', os.fspath(tmp_path))
  assert synthetic.default_root(seed=2) == tmp_path / (
      f'synthetic_pose_v{synthetic.VERSION}_seed2_train600_val1000')
  assert synthetic.default_root(2, SMALL).name.endswith('_train10_val4')
  assert synthetic.default_root(2, dict(synthetic.SIZES)) == (
      synthetic.default_root(2))
  ann, _ = synthetic.ensure('', seed=2, sizes=SMALL)['val']
  assert ann.parent.parent == synthetic.default_root(2, SMALL)
