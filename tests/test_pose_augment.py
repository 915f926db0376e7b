"""Training samples (flip, half body, scale/rotation, UDP crop), UDP heatmap
targets and the heatmap loss of the ViTPose COCO recipe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.pose import augment, decode, targets, topdown
from mae_jax.pose.keypoints import FLIP_PAIRS, NUM_KEYPOINTS

INPUT_HW = (256, 192)
HEATMAP_HW = (64, 48)
STRIDE = np.array([191 / 47, 255 / 63])  # input pixels per grid step (x, y)
NO_AUGMENT = dict(flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0,
                  rot_factor=0.0)


def _image(h=180, w=240, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (h, w, 3), dtype=np.uint8)


def _person(x0=60.0, y0=20.0, w=90.0, h=150.0, seed=1):
  """17 labelled COCO keypoints (x, y, 2) inside the box (x0, y0, w, h),
  the upper body (ids 0-10) in its top half, the lower body below."""
  rng = np.random.default_rng(seed)
  ys = np.where(np.arange(NUM_KEYPOINTS) <= 10,
                rng.uniform(y0 + 5, y0 + 0.45 * h, NUM_KEYPOINTS),
                rng.uniform(y0 + 0.55 * h, y0 + h - 5, NUM_KEYPOINTS))
  xs = rng.uniform(x0 + 5, x0 + w - 5, NUM_KEYPOINTS)
  keypoints = np.stack([xs, ys, np.full(NUM_KEYPOINTS, 2.0)], axis=1)
  return keypoints.astype(np.float32), np.array([x0, y0, w, h])


def _to_grid(xy):
  return np.asarray(xy, np.float64) / STRIDE


# --- targets -----------------------------------------------------------------


def test_udp_target_is_the_gaussian_at_the_subpixel_joint_within_its_window():
  joint = np.array([[100.3, 150.7]])
  heatmaps, weight = targets.udp_heatmaps(joint, np.ones(1))
  assert heatmaps.shape == (64, 48, 1) and heatmaps.dtype == np.float32
  assert weight.tolist() == [1.0]
  mu = _to_grid(joint[0])
  centre = (mu + 0.5).astype(int)
  yy, xx = np.mgrid[0:64, 0:48]
  inside = (np.abs(xx - centre[0]) <= 6) & (np.abs(yy - centre[1]) <= 6)
  expected = np.exp(-((xx - mu[0]) ** 2 + (yy - mu[1]) ** 2) / 8.0)
  np.testing.assert_allclose(heatmaps[..., 0][inside], expected[inside],
                             rtol=1e-6, atol=1e-7)
  assert np.all(heatmaps[..., 0][~inside] == 0)
  assert np.count_nonzero(inside) == 13 * 13


def test_udp_target_peaks_at_the_joint_to_subpixel_precision():
  joint = np.array([[100.3, 150.7], [7.9, 201.2]])
  heatmaps, _ = targets.udp_heatmaps(joint, np.ones(2))
  coords, scores = decode.argmax_coords(heatmaps[None])
  np.testing.assert_array_equal(coords[0], np.round(_to_grid(joint)))
  # The log of an untruncated Gaussian is quadratic: one Newton step from
  # the integer peak on its 3-point second difference recovers mu.
  for k in range(2):
    x, y = coords[0, k].astype(int)
    logs = np.log(heatmaps[y - 1:y + 2, x - 1:x + 2, k].astype(np.float64))
    x, y = 1, 1
    dx = 0.5 * (logs[y, x + 1] - logs[y, x - 1]) / -(
        logs[y, x + 1] - 2 * logs[y, x] + logs[y, x - 1])
    dy = 0.5 * (logs[y + 1, x] - logs[y - 1, x]) / -(
        logs[y + 1, x] - 2 * logs[y, x] + logs[y - 1, x])
    np.testing.assert_allclose(coords[0, k] + [dx, dy], _to_grid(joint[k]),
                               atol=1e-4)


def test_udp_target_decodes_back_to_the_image_joint():
  """Image joint -> UDP crop -> UDP target -> DARK-UDP decode -> image."""
  center, scale = topdown.box_to_center_scale([40.0, 30.0, 120.0, 200.0])
  image_joint = np.array([[95.2, 133.9]])
  matrix = topdown.crop_matrix(center, scale)
  joint = image_joint @ matrix[:, :2].T + matrix[:, 2]
  heatmaps, _ = targets.udp_heatmaps(joint, np.ones(1))
  decoded = decode.decode(heatmaps[None], center[None], scale[None])
  np.testing.assert_allclose(decoded[0, 0, :2], image_joint[0], atol=0.01)


def test_udp_target_values_lie_in_unit_interval_with_peak_one_on_grid_points():
  grid = np.array([[10, 20], [0, 0], [47, 63]], np.float64)
  heatmaps, weight = targets.udp_heatmaps(grid * STRIDE, np.ones(3))
  assert heatmaps.min() >= 0 and heatmaps.max() <= 1
  assert weight.tolist() == [1.0, 1.0, 1.0]
  for k, (x, y) in enumerate(grid.astype(int)):
    assert heatmaps[y, x, k] == 1.0
    assert heatmaps[..., k].max() == 1.0


def test_udp_target_weight_is_zero_for_unlabelled_and_far_outside_joints():
  joints = np.array([[100.0, 100.0],    # not labelled
                     [-100.0, 50.0],    # window wholly left of the grid
                     [50.0, 300.0],     # window wholly below the grid
                     [100.0, 100.0]])   # labelled, inside
  heatmaps, weight = targets.udp_heatmaps(joints, np.array([0, 1, 1, 1]))
  assert weight.tolist() == [0.0, 0.0, 0.0, 1.0]
  assert np.all(heatmaps[..., :3] == 0)
  assert heatmaps[..., 3].max() > 0.9


def test_udp_target_keeps_a_joint_outside_the_input_whose_window_overlaps():
  # As in the official encoding, only a window wholly off the grid zeroes
  # the weight: a joint 5 pixels left of the input keeps weight 1 and the
  # visible part of its Gaussian.
  heatmaps, weight = targets.udp_heatmaps(np.array([[-5.0, 128.0]]),
                                          np.ones(1))
  assert weight.tolist() == [1.0]
  mu = _to_grid([-5.0, 128.0])
  np.testing.assert_allclose(heatmaps[32, 0, 0],
                             np.exp(-(mu[0] ** 2 + (32 - mu[1]) ** 2) / 8),
                             rtol=1e-6)
  # mu_x = -1.23 rounds as int(mu + 0.5) = 0 (towards zero), so the
  # window spans grid columns -6..6.
  assert heatmaps[32, 6, 0] > 0 and np.all(heatmaps[:, 7:, 0] == 0)


# --- loss --------------------------------------------------------------------


def test_joints_mse_loss_is_zero_for_a_perfect_prediction():
  heatmaps = np.random.default_rng(0).random((2, 8, 6, 3)).astype(np.float32)
  assert float(targets.joints_mse_loss(heatmaps, heatmaps,
                                       np.ones((2, 3)))) == 0.0


def test_joints_mse_loss_matches_a_hand_computed_value():
  # N=1, h=1, w=2, K=2. Joint 0: errors (1, 2), weight 1 -> mean 2.5;
  # joint 1: errors (2, 4) * weight 0.5 = (1, 2) -> mean 2.5;
  # (2.5 + 2.5) / K = 2.5.
  pred = np.array([[[[1.0, 2.0], [2.0, 4.0]]]], np.float32)
  loss = targets.joints_mse_loss(pred, np.zeros_like(pred),
                                 np.array([[1.0, 0.5]]))
  assert float(loss) == pytest.approx(2.5)


def test_joints_mse_loss_ignores_joints_of_weight_zero():
  rng = np.random.default_rng(0)
  pred = rng.random((2, 4, 3, 3)).astype(np.float32)
  target = rng.random((2, 4, 3, 3)).astype(np.float32)
  weight = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  other = pred.copy()
  other[0, ..., 1] += 5.0
  other[1, ..., 2] -= 3.0
  assert float(targets.joints_mse_loss(pred, target, weight)) == \
      pytest.approx(float(targets.joints_mse_loss(other, target, weight)))


def test_joints_mse_loss_gradient_is_finite_and_zero_for_weight_zero():
  rng = np.random.default_rng(0)
  pred = jnp.asarray(rng.random((2, 4, 3, 3)), jnp.float32)
  target = jnp.asarray(rng.random((2, 4, 3, 3)), jnp.float32)
  weight = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
  grad = jax.grad(targets.joints_mse_loss)(pred, target, weight)
  assert bool(jnp.all(jnp.isfinite(grad)))
  assert bool(jnp.all(grad[0, ..., 1] == 0))
  assert bool(jnp.any(grad[0, ..., 0] != 0))


# --- samples -----------------------------------------------------------------


def test_sample_without_augmentation_equals_the_evaluation_crop():
  image = _image()
  keypoints, box = _person()
  sample = augment.train_sample(image, keypoints, box,
                                np.random.default_rng(0), **NO_AUGMENT)
  inputs, centers, scales = topdown.model_inputs(image, box[None])
  assert sample['image'].dtype == np.float32
  np.testing.assert_array_equal(sample['image'], inputs[0])
  matrix = topdown.crop_matrix(centers[0], scales[0])
  np.testing.assert_allclose(
      sample['joints'], keypoints[:, :2] @ matrix[:, :2].T + matrix[:, 2],
      rtol=1e-6, atol=1e-4)
  assert sample['visible'].tolist() == [1.0] * NUM_KEYPOINTS
  assert not sample['flipped'] and sample['rotation'] == 0


def test_flip_swaps_left_and_right_joints_and_mirrors_x():
  image = np.zeros((4, 10, 3), np.uint8)
  joints = np.array([[2.0, 1.0], [3.0, 2.0], [7.5, 3.0]], np.float32)
  visible = np.array([1.0, 1.0, 0.0], np.float32)
  flipped, out, vis, center = augment.flip(
      image, joints, visible, np.array([4.0, 2.0], np.float32),
      flip_pairs=((1, 2),))
  # Joint 0 mirrors in place; 1 and 2 trade places (and visibility); the
  # unlabelled joint now at index 1 is zeroed, as the official flip does.
  np.testing.assert_array_equal(out, [[7.0, 1.0], [0.0, 0.0], [6.0, 2.0]])
  np.testing.assert_array_equal(vis, [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(center, [5.0, 2.0])
  assert flipped.shape == image.shape


def test_flipped_sample_is_the_mirror_of_the_unflipped_one():
  image = _image()
  keypoints, box = _person()
  keypoints[3, 2] = 0  # left ear unlabelled
  plain = augment.train_sample(image, keypoints, box,
                               np.random.default_rng(0), **NO_AUGMENT)
  mirrored = augment.train_sample(image, keypoints, box,
                                  np.random.default_rng(0),
                                  **dict(NO_AUGMENT, flip_prob=1.0))
  assert mirrored['flipped']
  np.testing.assert_allclose(mirrored['image'], plain['image'][:, ::-1],
                             atol=1.01 / 255 / 0.224)
  order = np.arange(NUM_KEYPOINTS)
  for left, right in FLIP_PAIRS:
    order[left], order[right] = right, left
  np.testing.assert_array_equal(mirrored['visible'], plain['visible'][order])
  labelled = mirrored['visible'] > 0
  partner = plain['joints'][order][labelled]
  np.testing.assert_allclose(mirrored['joints'][labelled, 0],
                             191 - partner[:, 0], atol=1e-3)
  np.testing.assert_allclose(mirrored['joints'][labelled, 1], partner[:, 1],
                             atol=1e-3)


def test_same_seed_gives_the_same_sample():
  image = _image()
  keypoints, box = _person()
  a, b = (augment.train_sample(image, keypoints, box,
                               np.random.default_rng(7)) for _ in range(2))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = augment.train_sample(image, keypoints, box, np.random.default_rng(8))
  assert not np.array_equal(a['joints'], c['joints'])


def test_half_body_crop_covers_the_chosen_upper_or_lower_body():
  image = _image()
  keypoints, box = _person()
  upper = np.arange(NUM_KEYPOINTS) <= 10
  chosen = set()
  for seed in range(12):
    sample = augment.train_sample(
        image, keypoints, box, np.random.default_rng(seed),
        **dict(NO_AUGMENT, half_body_prob=1.0))
    part = 'upper' if np.allclose(
        sample['center'], keypoints[upper, :2].mean(0), atol=1e-3) else 'lower'
    mask = upper if part == 'upper' else ~upper
    np.testing.assert_allclose(sample['center'], keypoints[mask, :2].mean(0),
                               atol=1e-3)
    chosen.add(part)
    # The box is the joints' extent grown to 3:4, then by 1.5.
    w, h = np.ptp(keypoints[mask, :2], axis=0)
    h = max(h, w * 256 / 192)
    np.testing.assert_allclose(sample['scale'] * 200,
                               [h * 192 / 256 * 1.5, h * 1.5], rtol=1e-5)
    inside = sample['joints'][mask]
    assert np.all((inside >= 0) & (inside <= [191, 255]))
  assert chosen == {'upper', 'lower'}


def test_half_body_needs_more_than_the_threshold_of_labelled_joints():
  image = _image()
  keypoints, box = _person()
  keypoints[8:, 2] = 0  # 8 labelled joints: not more than 8
  sample = augment.train_sample(image, keypoints, box,
                                np.random.default_rng(0),
                                **dict(NO_AUGMENT, half_body_prob=1.0))
  center, scale = topdown.box_to_center_scale(box)
  np.testing.assert_array_equal(sample['center'], center)
  np.testing.assert_array_equal(sample['scale'], scale)


def test_rotation_keeps_the_box_centre_at_the_input_centre():
  image = _image()
  keypoints, box = _person()
  center, _ = topdown.box_to_center_scale(box)
  keypoints[0, :2] = center
  rotations = []
  for seed in range(4):
    sample = augment.train_sample(
        image, keypoints, box, np.random.default_rng(seed),
        **dict(NO_AUGMENT, rot_factor=40, rot_prob=1.0))
    rotations.append(sample['rotation'])
    np.testing.assert_allclose(sample['joints'][0], [95.5, 127.5], atol=1e-3)
  assert all(r != 0 and abs(r) <= 80 for r in rotations)


def test_sample_scale_is_the_box_scale_times_a_clipped_normal_factor():
  image = _image(60, 80)
  keypoints, box = _person(20, 5, 30, 50)
  _, scale = topdown.box_to_center_scale(box)
  ratios = np.array([
      augment.train_sample(image, keypoints, box, np.random.default_rng(s),
                           **dict(NO_AUGMENT, scale_factor=0.5))['scale']
      / scale for s in range(40)])
  np.testing.assert_allclose(ratios[:, 0], ratios[:, 1], rtol=1e-6)
  assert ratios.min() >= 0.5 - 1e-6 and ratios.max() <= 1.5 + 1e-6
  assert ratios.min() < 0.7 and ratios.max() > 1.3


def test_random_scale_and_rotation_stay_in_their_official_ranges():
  rng = np.random.default_rng(0)
  draws = np.array([augment.random_scale_rotation(rng) for _ in range(2000)])
  factors, angles = draws[:, 0], draws[:, 1]
  assert factors.min() == 0.5 and factors.max() == 1.5  # clipped normal
  assert np.abs(angles).max() <= 80
  assert 0.35 < np.mean(angles == 0) < 0.45  # kept with probability 0.6


def test_augmented_joints_follow_the_image_content():
  """A bright spot painted at each joint ends up at the sample's joint,
  through flip, half body, scale and rotation."""
  keypoints, box = _person()
  image = np.zeros((180, 240, 3), np.uint8)
  yy, xx = np.mgrid[0:180, 0:240]
  k = 5  # one joint per image keeps the spots apart
  spot = np.exp(-((xx - keypoints[k, 0]) ** 2 + (yy - keypoints[k, 1]) ** 2)
                / (2 * 3.0 ** 2))
  image[..., 1] = np.round(255 * spot).astype(np.uint8)
  checked = set()
  for seed in range(8):
    sample = augment.train_sample(
        image, keypoints, box, np.random.default_rng(seed), flip_prob=0.5,
        half_body_prob=0.5, rot_prob=1.0)
    index = (5, 6)[int(sample['flipped'])]  # a flip relabels the shoulder
    joint = sample['joints'][index]
    if not np.all((joint >= 8) & (joint <= [183, 247])):
      continue  # cropped out (e.g. a lower-body crop)
    green = sample['image'][..., 1]
    y, x = np.unravel_index(np.argmax(green), green.shape)
    np.testing.assert_allclose([x, y], joint, atol=1.5)
    checked.add(sample['flipped'])
  assert checked == {False, True}
