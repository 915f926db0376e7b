"""A small synthetic COCO-format person keypoint dataset, generated locally.

Each image shows one or two front-facing mannequins over a crop of a
photograph shipped with scikit-image (`mae_jax.embedded`): a polygon torso,
an elliptical head with eyes, nose and ears, limbs as thick lines, and a dot
on each of the 17 COCO joints (`keypoints.KEYPOINT_NAMES`). Pose (limb and
neck angles, lean, face turn), size (40-95% of the image height for one
person), position, limb width, colours and background vary per image; some
people are partly covered by a rectangle or ellipse and some reach past the
image border.

Left and right are told apart by the figure itself: every mannequin faces
the camera, so its left shoulder and hip lie on the image's right. Left limbs
are also drawn in a lighter shade than right limbs; a horizontal flip (with
the flip pairs swapped) keeps the first cue and reverses the second, so
under flip augmentation only the first one carries information.

Labels follow COCO: pixel coordinates, x right, y down, with the centre of
pixel (column i, row j) at (i, j) (the convention of the unbiased top-down
crop in `topdown`); each joint's dot is drawn centred on its label. v=2: the
pixel at (floor(x + 0.5), floor(y + 0.5)) shows the joint's dot; v=1: the
joint lies in the image but its dot is covered there (by a covering shape,
the other person or another joint of the same person); v=0 with x = y = 0:
outside [0, W - 1] x [0, H - 1]. Labels are rounded to 0.01 px before
drawing. bbox: the extent of the pixel centres covered by the person's
drawing (and its labelled joints), clipped to the image. area, which COCO's
keypoint evaluation (pycocotools) uses as the OKS scale: the bbox area
times AREA_PER_BOX, standing in for the silhouette area of a real person
(the thin mannequin's own area would make the OKS stricter than COCO's).

Everything in image `index` comes from `np.random.default_rng([seed,
index])`; the train and val splits use disjoint index ranges, so the val
images do not depend on the train size. `ensure` writes JPEG files and COCO
JSON once per (VERSION, seed, sizes) and reuses them afterwards.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from mae_jax import embedded, paths
from mae_jax.errors import ConfigError
from mae_jax.pose import keypoints

VERSION = 1
# 1,000 held-out images (1,242 people): on 100, the AP of two tiny pose runs
# moved by about 0.01 between the two sets, more than the gaps it was used to
# judge (docs/POSE.md).
SIZES = {'train': 600, 'val': 1000}
# First image index (and image id) of each split.
SPLIT_START = {'train': 0, 'val': 1_000_000}
AREA_PER_BOX = 0.6
JPEG_QUALITY = 90
MANIFEST = 'manifest.json'
SUPERSAMPLE = 2        # drawn at this many times the size, then box-reduced
IMAGE_WIDTHS = (176, 192, 208)
IMAGE_HEIGHTS = (240, 256, 272)
MIN_LABELLED = 6       # people with fewer in-image joints are re-posed
OCCLUDER_ID = 255

_L, _R = 1, -1         # a side's sign along the image x axis (front view)


def category():
  """The COCO 'person' category with its joint names and 1-based skeleton."""
  return {'id': 1, 'name': 'person', 'supercategory': 'person',
          'keypoints': list(keypoints.KEYPOINT_NAMES),
          'skeleton': [[a + 1, b + 1] for a, b in keypoints.SKELETON]}


def load_backgrounds():
  """The embedded photographs as (H, W, 3) uint8 RGB arrays."""
  return [np.asarray(Image.open(p).convert('RGB'))
          for p in embedded.embedded_paths()]


def _direction(deg):
  """Unit vector `deg` degrees from straight down, positive towards +x."""
  rad = math.radians(deg)
  return np.array([math.sin(rad), math.cos(rad)])


def _pose(rng, height):
  """(17, 2) joints of an upright figure `height` px tall, hips at 0,
  plus its head centre and radius."""
  j = np.zeros((keypoints.NUM_KEYPOINTS, 2))
  width = rng.uniform(0.7, 1.0)
  shoulder = np.array([0.0, -0.30 * height])
  for side, (sh, el, wr, hip, kn, an) in (
      (_L, (5, 7, 9, 11, 13, 15)), (_R, (6, 8, 10, 12, 14, 16))):
    j[sh] = shoulder + [side * 0.11 * height * width, 0]
    j[hip] = [side * 0.075 * height * width, 0]
    arm = side * rng.uniform(-25, 170)
    j[el] = j[sh] + 0.17 * height * _direction(arm)
    j[wr] = j[el] + 0.15 * height * _direction(arm + rng.uniform(-140, 140))
    thigh = side * (rng.uniform(-15, 90) if rng.random() < 0.2
                    else rng.uniform(-12, 35))
    j[kn] = j[hip] + 0.24 * height * _direction(thigh)
    j[an] = j[kn] + 0.24 * height * _direction(thigh + rng.uniform(-50, 50))
  radius = 0.065 * height
  tilt = rng.uniform(-20, 20)
  up = -_direction(tilt)
  across = np.array([-up[1], up[0]])     # +x when upright
  head = shoulder + up * (0.04 * height + radius)
  turn = rng.uniform(-0.3, 0.3) * radius
  j[0] = head - 0.15 * radius * up + turn * across
  for side, eye, ear in ((_L, 1, 3), (_R, 2, 4)):
    j[eye] = head + 0.25 * radius * up + (side * 0.4 * radius + turn) * across
    j[ear] = head + 0.1 * radius * up + side * 0.95 * radius * across
  lean = math.radians(rng.uniform(-20, 20))
  rot = np.array([[math.cos(lean), -math.sin(lean)],
                  [math.sin(lean), math.cos(lean)]])
  return j @ rot.T, head @ rot.T, radius


def _colour(rng, sat=(0.4, 1.0), val=(0.3, 1.0), hue=None):
  """An RGB tuple from an HSV colour with the given ranges."""
  h = rng.uniform(0, 1) if hue is None else hue
  s, v = rng.uniform(*sat), rng.uniform(*val)
  rgb = Image.new('HSV', (1, 1), (int(h * 255), int(s * 255), int(v * 255)))
  return rgb.convert('RGB').getpixel((0, 0))


def _person(rng, size, scale_range):
  """A posed, placed and coloured figure (a dict), re-posed until at least
  MIN_LABELLED joints fall inside the image of size (W, H)."""
  w, h = size
  while True:
    height = rng.uniform(*scale_range) * h
    joints, head, radius = _pose(rng, height)
    lo = np.minimum(joints.min(0), head - radius)
    hi = np.maximum(joints.max(0), head + radius)
    # Centre anywhere that keeps at least 75% of the figure's box inside.
    margin = 0.25 * (hi - lo)
    offset = np.array([rng.uniform(-lo[0] - margin[0], w - hi[0] + margin[0]),
                       rng.uniform(-lo[1] - margin[1], h - hi[1] + margin[1])])
    joints = np.round(joints + offset, 2)
    inside = ((joints >= 0) & (joints <= [w - 1, h - 1])).all(1)
    if inside.sum() >= MIN_LABELLED:
      break
  hue = rng.uniform(0, 1)
  limb = _colour(rng, hue=hue, val=(0.55, 0.8))
  return {
      'joints': joints, 'inside': inside, 'head': head + offset,
      'radius': radius, 'limb_width': height * rng.uniform(0.035, 0.06),
      'torso': _colour(rng), 'skin': _colour(rng, sat=(0.2, 0.6)),
      'left': tuple(min(255, int(c * 1.3) + 40) for c in limb),
      'right': tuple(int(c * 0.6) for c in limb),
      'dot': _colour(rng, hue=(hue + 0.5) % 1.0, sat=(0.8, 1.0),
                     val=(0.9, 1.0)),
  }


def _hi(point):
  """Image coordinates -> coordinates on the supersampled canvas."""
  return tuple(((np.asarray(point) + 0.5) * SUPERSAMPLE - 0.5).tolist())


def _disc(centre, radius, part):
  x, y = _hi(centre)
  r = radius * SUPERSAMPLE
  return 'ellipse', [x - r, y - r, x + r, y + r], {}, part


def _shapes(person):
  """The figure as (ImageDraw method, xy, options, part) in drawing order;
  part is a colour name of `person` or the index of a joint's dot."""
  j, lw = person['joints'], person['limb_width']
  shapes = [('polygon', [_hi(j[k]) for k in (5, 6, 12, 11)], {}, 'torso')]
  width = max(1, int(round(lw * SUPERSAMPLE)))
  for side, chain in (('left', (11, 13, 15)), ('right', (12, 14, 16)),
                      ('left', (5, 7, 9)), ('right', (6, 8, 10))):
    for a, b in zip(chain, chain[1:]):
      shapes.append(('line', [_hi(j[a]), _hi(j[b])], {'width': width}, side))
      shapes.append(_disc(j[b], lw / 2, side))
  shapes += [_disc(j[k], lw / 2, 'torso') for k in (5, 6, 11, 12)]
  (x, y), r = _hi(person['head']), person['radius'] * SUPERSAMPLE
  shapes.append(('ellipse', [x - 0.85 * r, y - r, x + 0.85 * r, y + r], {},
                 'skin'))
  dot, face_dot = max(1.5, 0.3 * lw), max(1.3, 0.12 * person['radius'])
  shapes += [_disc(j[k], face_dot if k < 5 else dot, k)
             for k in range(keypoints.NUM_KEYPOINTS)]
  return shapes


def _paint(canvas, shapes, fills):
  """Draws `shapes` on a PIL image, filling each with fills[part]."""
  draw = ImageDraw.Draw(canvas)
  for method, xy, options, part in shapes:
    getattr(draw, method)(xy, fill=fills[part], **options)


def _fills(person, p):
  """Fills of each part: (colours, id-map values, person-mask values).

  The id map holds 20 * p + 1 for person p's body and 20 * p + 2 + k for its
  joint k's dot."""
  body = ('torso', 'left', 'right', 'skin')
  joints = range(keypoints.NUM_KEYPOINTS)
  colours = {n: person[n] for n in body}
  colours.update(dict.fromkeys(joints, person['dot']))
  ids = dict.fromkeys(body, 20 * p + 1)
  ids.update({k: 20 * p + 2 + k for k in joints})
  return colours, ids, dict.fromkeys((*body, *joints), 1)


def _background(rng, photos, size):
  """A random crop of a random photo resized to `size` (W, H), possibly
  mirrored and with its brightness scaled."""
  photo = photos[rng.integers(len(photos))]
  ph, pw = photo.shape[:2]
  aspect = size[0] / size[1]
  ch = int(rng.uniform(0.3, 1.0) * min(ph, pw / aspect))
  cw = max(1, int(ch * aspect))
  y0, x0 = rng.integers(ph - ch + 1), rng.integers(pw - cw + 1)
  crop = photo[y0:y0 + ch, x0:x0 + cw]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  crop = (crop.astype(np.float32) * rng.uniform(0.6, 1.2)).clip(0, 255)
  return Image.fromarray(crop.astype(np.uint8)).resize(size, Image.BILINEAR)


def render(seed, index, photos):
  """Image `index` of the set drawn with `seed`.

  photos: `load_backgrounds()`. Returns (image, people): image a (H, W, 3)
  uint8 array; people a list of dicts with 'keypoints' ((17, 3) float64 x,
  y, v in COCO's convention, see the module doc), 'bbox' ([x, y, w, h])
  and 'dot_colour' (the RGB of its joint dots).
  """
  rng = np.random.default_rng([seed, index])
  size = (int(rng.choice(IMAGE_WIDTHS)), int(rng.choice(IMAGE_HEIGHTS)))
  s = SUPERSAMPLE
  big = (size[0] * s, size[1] * s)
  image = _background(rng, photos, big)
  ids = Image.new('L', big, 0)
  two = rng.random() < 0.25
  people = [_person(rng, size, (0.4, 0.7) if two else (0.4, 0.95))
            for _ in range(2 if two else 1)]
  masks = []
  for p, person in enumerate(people):
    shapes = _shapes(person)
    masks.append(Image.new('L', big, 0))
    for canvas, fills in zip((image, ids, masks[-1]), _fills(person, p)):
      _paint(canvas, shapes, fills)
  for _ in range(rng.choice(3, p=(0.6, 0.3, 0.1))):
    target = people[rng.integers(len(people))]['joints'][
        rng.integers(keypoints.NUM_KEYPOINTS)]
    half = rng.uniform(0.04, 0.14, size=2) * size[1]
    centre = (target + rng.uniform(-1, 1, size=2) * half + 0.5) * s - 0.5
    box = [*(centre - half * s), *(centre + half * s)]
    kind = 'rectangle' if rng.random() < 0.5 else 'ellipse'
    colour = _colour(rng)
    getattr(ImageDraw.Draw(image), kind)(box, fill=colour)
    getattr(ImageDraw.Draw(ids), kind)(box, fill=OCCLUDER_ID)
  ids = np.asarray(ids)
  labels = []
  for p, (person, mask) in enumerate(zip(people, masks)):
    kps = np.zeros((keypoints.NUM_KEYPOINTS, 3))
    for k, ((x, y), inside) in enumerate(zip(person['joints'],
                                              person['inside'])):
      if not inside:
        continue
      c, r = int(math.floor(x + 0.5)) * s, int(math.floor(y + 0.5)) * s
      shown = (ids[r:r + s, c:c + s] == 20 * p + 2 + k).all()
      kps[k] = x, y, 2 if shown else 1
    rows, cols = np.nonzero(np.asarray(mask))
    xs = np.concatenate([(cols + 0.5) / s - 0.5, kps[kps[:, 2] > 0, 0]])
    ys = np.concatenate([(rows + 0.5) / s - 0.5, kps[kps[:, 2] > 0, 1]])
    # Labelled joints lie in the box: round its corners outwards.
    x0 = math.floor(max(0.0, xs.min()) * 100) / 100
    y0 = math.floor(max(0.0, ys.min()) * 100) / 100
    x1 = math.ceil(min(size[0] - 1.0, xs.max()) * 100) / 100
    y1 = math.ceil(min(size[1] - 1.0, ys.max()) * 100) / 100
    labels.append({'keypoints': kps, 'dot_colour': person['dot'],
                   'bbox': [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]})
  return np.asarray(image.reduce(s)), labels


def default_root(seed=0, sizes=None):
  """The cache folder of the set: $MAE_JAX_CACHE (default ~/.cache/mae_jax)
  / synthetic_pose_v{VERSION}_seed{seed}_train{n}_val{m}, with the sizes
  (default SIZES) in the name, so sets of other sizes never collide."""
  cache = os.environ.get('MAE_JAX_CACHE') or '~/.cache/mae_jax'
  sizes = dict(SIZES if sizes is None else sizes)
  name = f'synthetic_pose_v{VERSION}_seed{seed}' + ''.join(
      f'_{k}{v}' for k, v in sorted(sizes.items()))
  return paths.resolve(cache) / name


def _write(folder, seed, sizes, photos):
  """Writes every split's images and JSON into `folder`, manifest last."""
  for split, count in sizes.items():
    (folder / split).mkdir()
    images, annotations = [], []
    for index in range(SPLIT_START[split], SPLIT_START[split] + count):
      image, people = render(seed, index, photos)
      name = f'{index:07d}.jpg'
      Image.fromarray(image).save(os.fspath(folder / split / name),
                                  quality=JPEG_QUALITY)
      images.append({'id': index, 'file_name': name,
                     'width': image.shape[1], 'height': image.shape[0]})
      for p, person in enumerate(people):
        kps = person['keypoints']
        _, _, bw, bh = person['bbox']
        annotations.append({
            'id': 2 * index + p + 1,
            'image_id': index, 'category_id': 1, 'bbox': person['bbox'],
            'area': round(AREA_PER_BOX * bw * bh, 2), 'iscrowd': 0,
            'keypoints': [round(float(v), 2) if i % 3 < 2 else int(v)
                          for i, v in enumerate(kps.ravel())],
            'num_keypoints': int((kps[:, 2] > 0).sum())})
    (folder / 'annotations').mkdir(exist_ok=True)
    (folder / 'annotations' / f'person_keypoints_{split}.json').write_text(
        json.dumps({'images': images, 'annotations': annotations,
                    'categories': [category()]}))
  (folder / MANIFEST).write_text(json.dumps(
      {'version': VERSION, 'seed': seed, 'sizes': sizes}, sort_keys=True))


def _manifest(root):
  """The manifest dict of a complete set in `root`, or None."""
  try:
    return json.loads((root / MANIFEST).read_text())
  except (FileNotFoundError, NotADirectoryError, ValueError):
    return None


def _check_replaceable(root):
  """Raises ConfigError unless `root` is a folder holding only a set's
  files (it is about to be replaced)."""
  ours = {'annotations', MANIFEST, *SPLIT_START}
  if not root.is_dir() or set(os.listdir(os.fspath(root))) - ours:
    raise ConfigError(f'{paths.shown(root)} exists and is not a synthetic '
                      'pose set; give another root')


def _remove_incomplete(root):
  """Deletes `root`, a set without a manifest (unless another writer has
  already moved it)."""
  _check_replaceable(root)
  stale = tempfile.mkdtemp(prefix=f'.{root.name}.stale-',
                           dir=os.fspath(root.parent))
  try:
    os.replace(os.fspath(root), os.path.join(stale, 'old'))
  except FileNotFoundError:
    pass                        # another writer moved it first
  shutil.rmtree(stale)


def ensure(root=None, seed=0, sizes=None):
  """Writes the set into `root` unless a complete one is there.

  root: a local folder (None or '': `default_root(seed, sizes)`); sizes: images
  per split, default SIZES ({'train': 600, 'val': 1000}). The set is built in
  a temporary sibling folder and renamed into place, so a reader sees it
  whole or not at all; a folder without a manifest is replaced. Returns
  {split: (annotation JSON path, image folder)} as epath.Paths.
  """
  sizes = dict(SIZES if sizes is None else sizes)
  unknown = sorted(set(sizes) - set(SPLIT_START))
  if unknown:
    raise ConfigError(f'unknown synthetic pose split {unknown[0]!r}; '
                      f'known: {sorted(SPLIT_START)}')
  root = paths.resolve(root) if root else default_root(seed, sizes)
  if paths.is_uri(root):
    raise ConfigError(f'synthetic pose data needs a local folder, got {root}')
  want = {'version': VERSION, 'seed': seed, 'sizes': sizes}
  found = _manifest(root)
  if found is None:
    if root.exists():
      _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.resolve(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-',
                                         dir=os.fspath(root.parent)))
    try:
      _write(tmp, seed, sizes, load_backgrounds())
      if root.exists() and _manifest(root) is None:
        _remove_incomplete(root)
      try:
        os.rename(os.fspath(tmp), os.fspath(root))
      except OSError:
        if _manifest(root) is None:    # not a concurrent writer's set
          raise
    finally:
      shutil.rmtree(os.fspath(tmp), ignore_errors=True)
    found = _manifest(root)
  if found != want:
    raise ConfigError(f'{paths.shown(root)} holds another synthetic pose set '
                      f'({found}); expected {want}')
  return {split: (root / 'annotations' / f'person_keypoints_{split}.json',
                  root / split) for split in sizes}
