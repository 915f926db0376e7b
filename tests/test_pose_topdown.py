"""Top-down pose path (crops, decoding, figures) against Hugging Face
transformers' ViTPose image processor, and decoding of synthetic UDP
heatmaps whose true joint positions are known."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.vitpose.image_processing_vitpose import (
    VitPoseImageProcessor, box_to_center_and_scale, get_warp_matrix)
from transformers.models.vitpose.modeling_vitpose import flip_back as hf_flip

from mae_jax.pose import decode, figure, keypoints, topdown

BOXES = [[10.3, 20.7, 200.2, 80.5],   # wide
         [150.0, 30.0, 40.0, 190.0],  # tall
         [-20.0, 100.0, 100.0, 200.0],  # partly outside the image
         [60.0, 40.0, 96.0, 128.0]]   # already 3:4


def _hf_matrix(center, scale, rotation=0.0, dtype=np.float32):
  return get_warp_matrix(rotation, (center * 2.0).astype(dtype),
                         np.array((192, 256)) - 1.0,
                         (scale * 200.0).astype(dtype))


def _nchw(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def _blobs(centers_xy, hw, sigma=2.0):
  """(P, h, w, K) UDP Gaussian heatmaps centred at (P, K, 2) (x, y)."""
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
  dx = xx[None, :, :, None] - centers_xy[:, None, None, :, 0]
  dy = yy[None, :, :, None] - centers_xy[:, None, None, :, 1]
  return np.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_keypoint_constants_are_consistent():
  assert len(keypoints.KEYPOINT_NAMES) == len(keypoints.OKS_SIGMAS) == 17
  for left, right in keypoints.FLIP_PAIRS:
    assert keypoints.KEYPOINT_NAMES[left].replace('left', 'right') == (
        keypoints.KEYPOINT_NAMES[right])
  assert {j for limb in keypoints.SKELETON for j in limb} == set(range(17))
  assert keypoints.OKS_SIGMAS[0] == pytest.approx(0.026)


@pytest.mark.parametrize('box', BOXES)
def test_center_scale_and_warp_matrix_equal_transformers(box):
  hf_center, hf_scale = box_to_center_and_scale(box, 192, 256)
  center, scale = topdown.box_to_center_scale(box)
  assert center.dtype == scale.dtype == np.float32
  np.testing.assert_array_equal(center, hf_center)
  np.testing.assert_array_equal(scale, hf_scale)
  aspect = scale[0] / scale[1]
  assert aspect == pytest.approx(192 / 256, rel=1e-6)
  np.testing.assert_array_equal(topdown.crop_matrix(center, scale),
                                _hf_matrix(hf_center, hf_scale))
  for rotation in (30.0, -45.0, 17.5):
    mine = topdown.crop_matrix(center, scale, rotation=rotation)
    # Same formula in float64: bit for bit. Transformers' float32 sizes
    # round its translation to float32 (a relative 2e-7 at most).
    np.testing.assert_array_equal(
        mine, _hf_matrix(hf_center, hf_scale, rotation, np.float64))
    hf32 = _hf_matrix(hf_center, hf_scale, rotation)
    assert np.abs(mine - hf32).max() <= 2e-7 * np.abs(hf32).max()


def test_warp_matrix_maps_the_box_onto_the_input_grid():
  center, scale = topdown.box_to_center_scale([40.0, 30.0, 60.0, 80.0])
  m = topdown.crop_matrix(center, scale)
  extent = scale * 200.0
  corners = np.array([[center[0] - extent[0] / 2, center[1] - extent[1] / 2,
                       1.0],
                      [center[0] + extent[0] / 2, center[1] + extent[1] / 2,
                       1.0]])
  np.testing.assert_allclose(corners @ m.T, [[0, 0], [191, 255]], atol=1e-4)


def test_model_inputs_equal_transformers_pixel_values():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
  boxes = BOXES[:2]
  hf = VitPoseImageProcessor()(images=Image.fromarray(image), boxes=[boxes],
                               return_tensors='np')['pixel_values']
  inputs, centers, scales = topdown.model_inputs(image, boxes)
  assert inputs.shape == (2, 256, 192, 3) and inputs.dtype == np.float32
  assert centers.shape == scales.shape == (2, 2)
  # The uint8 crops are identical; only the normalisation's float32
  # rounding differs (measured 2.4e-7).
  np.testing.assert_allclose(inputs, hf.transpose(0, 2, 3, 1), rtol=0,
                             atol=1e-6)
  mean = np.array(topdown.IMAGENET_MEAN)
  std = np.array(topdown.IMAGENET_STD)
  hf_crops = np.round((hf.transpose(0, 2, 3, 1) * std + mean) * 255)
  crops = np.stack([topdown.crop(image, c, s)
                    for c, s in zip(centers, scales)])
  assert crops.dtype == np.uint8
  np.testing.assert_array_equal(crops, hf_crops)


def test_model_inputs_without_boxes_crop_the_whole_image():
  image = np.full((120, 90, 3), 200, np.uint8)
  for boxes in (None, np.zeros((0, 4))):
    inputs, centers, scales = topdown.model_inputs(image, boxes,
                                                   input_hw=(64, 48))
    assert inputs.shape == (1, 64, 48, 3)
    np.testing.assert_array_equal(centers, [[45.0, 60.0]])
    np.testing.assert_allclose(scales, [[90 / 200 * 1.25, 120 / 200 * 1.25]],
                               rtol=1e-6)
  # Padding 1.25 leaves a zero border around the image content.
  crop = topdown.crop(image, centers[0], scales[0], input_hw=(64, 48))
  assert crop[0, 0].tolist() == [0, 0, 0] and crop[32, 24].tolist() == [
      200, 200, 200]
  with pytest.raises(ValueError, match=r'\(5, 3\)'):
    topdown.model_inputs(image, np.zeros((5, 3)))


def test_flip_back_equals_transformers():
  heatmaps = np.random.default_rng(1).random((2, 8, 6, 17), np.float32)
  pairs = keypoints.FLIP_PAIRS
  hf = hf_flip(torch.from_numpy(_nchw(heatmaps)), torch.tensor(pairs))
  mine = decode.flip_back(heatmaps, pairs)
  np.testing.assert_array_equal(mine, hf.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(decode.flip_back(mine, pairs), heatmaps)


def test_argmax_coords_are_x_y_and_stay_minus_one_without_a_peak():
  heatmaps = np.zeros((1, 5, 4, 2), np.float32)
  heatmaps[0, 3, 1, 0] = 0.7
  heatmaps[0, :, :, 1] = -1.0
  coords, scores = decode.argmax_coords(heatmaps)
  np.testing.assert_array_equal(coords, [[[1, 3], [-1, -1]]])
  np.testing.assert_allclose(scores, [[0.7, -1.0]])
  refined = decode.refine_dark_udp(coords, heatmaps)
  np.testing.assert_array_equal(refined[0, 1], [-1, -1])


@pytest.mark.parametrize('kind', ['random', 'blobs'])
def test_decode_with_transformers_blur_equals_transformers(kind):
  rng = np.random.default_rng(2)
  p, h, w, k = 3, 64, 48, 17
  if kind == 'random':
    heatmaps = rng.random((p, h, w, k), np.float32) + 0.01
  else:
    peaks = np.stack([rng.uniform(1, w - 2, (p, k)),
                      rng.uniform(1, h - 2, (p, k))], axis=-1)
    heatmaps = _blobs(peaks, (h, w))
  centers = rng.uniform(50, 300, (p, 2)).astype(np.float32)
  scales = rng.uniform(0.5, 2.0, (p, 2)).astype(np.float32)
  hf_xy, hf_scores = VitPoseImageProcessor().keypoints_from_heatmaps(
      _nchw(heatmaps), centers, scales, kernel=11)
  mine = decode.decode(heatmaps, centers, scales, blur='transformers')
  assert mine.shape == (p, k, 3) and mine.dtype == np.float32
  # Measured 6.1e-5 px: transformers works in float32.
  np.testing.assert_allclose(mine[..., :2], hf_xy, rtol=0, atol=1e-3)
  np.testing.assert_array_equal(mine[..., 2], hf_scores[..., 0])


def test_dark_udp_recovers_subpixel_joints_of_udp_heatmaps():
  """Joints placed in the image, mapped into the crop's heatmap grid as
  the UDP targets are (sigma 2 Gaussians at sub-pixel centres, 64 x 48),
  decode back to the same image positions."""
  rng = np.random.default_rng(3)
  p, k, hw = 2, 17, (64, 48)
  centers = np.array([[120.0, 90.0], [300.5, 210.25]], np.float32)
  scales = np.array([[0.75, 1.0], [1.5, 2.0]], np.float32)
  # Grid positions at least 6 cells from the border: the official blur
  # reflects there and would pull the peak.
  grid = np.stack([rng.uniform(6, hw[1] - 7, (p, k)),
                   rng.uniform(6, hw[0] - 7, (p, k))], axis=-1)
  truth = decode.to_image(grid, centers, scales, hw)
  # The crop's forward map sends the truth onto the same grid positions.
  for i in range(p):
    m = topdown.crop_matrix(centers[i], scales[i]).astype(np.float64)
    in_crop = np.c_[truth[i], np.ones(k)] @ m.T
    np.testing.assert_allclose(in_crop * (np.array([47, 63]) / [191, 255]),
                               grid[i], atol=1e-3)
  heatmaps = _blobs(grid, hw)
  coords, _ = decode.argmax_coords(heatmaps)
  refined = decode.refine_dark_udp(coords, heatmaps, blur='official')
  # Measured: 3.7e-5 grid cells after refinement, 0.5 for the argmax.
  assert np.abs(refined - grid).max() < 1e-4
  assert np.abs(coords - grid).mean() > 0.1
  keypoints_ = decode.decode(heatmaps, centers, scales)
  step = scales * 200.0 / [47, 63]   # image pixels per grid cell
  assert np.abs(keypoints_[..., :2] - truth).max() < 1e-4 * step.max()
  # The score is the grid maximum, the blob at the nearest cell.
  np.testing.assert_array_equal(keypoints_[..., 2], heatmaps.max(axis=(1, 2)))


def test_official_blur_is_the_opencv_gaussian_with_reflect_101_border():
  assert decode.blur_sigma_mode('official', 11) == (pytest.approx(2.0),
                                                    'mirror')
  taps = np.exp(-np.arange(-5, 6) ** 2 / (2 * 2.0 ** 2))
  taps /= taps.sum()
  kernel_2d = np.outer(taps, taps)
  # An impulse at the corner: reflect-101 (numpy 'reflect') repeats no edge.
  impulse = np.zeros((1, 20, 16, 1), np.float32)
  impulse[0, 1, 0, 0] = 1.0
  padded = np.pad(impulse[0, :, :, 0], 5, mode='reflect')
  expected = np.array([[np.sum(padded[r:r + 11, c:c + 11] * kernel_2d)
                        for c in range(16)] for r in range(20)])
  blurred = decode.blur_heatmaps(impulse, 11, 'official')[0, :, :, 0]
  np.testing.assert_allclose(blurred, expected, rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match="blur='cv2'"):
    decode.decode(impulse, np.zeros((1, 2)), np.ones((1, 2)), blur='cv2')


def test_pose_figure_writes_a_png_with_both_panels(tmp_path):
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
  boxes = [[10, 10, 60, 100], [80, 20, 50, 90]]
  heatmaps = rng.random((2, 64, 48, 17), np.float32)
  kps = np.concatenate([rng.uniform(10, 110, (2, 17, 2)),
                        rng.uniform(0, 1, (2, 17, 1))], axis=-1)
  fig = figure.pose_figure(image, kps, heatmaps, boxes, title='two people')
  assert len(fig.axes) == 2
  assert len(figure.pose_figure(image, kps).axes) == 1
  path = figure.save_pose_figure(tmp_path / 'pose.png', image, kps, heatmaps,
                                 boxes)
  assert path == tmp_path / 'pose.png'
  with Image.open(path) as png:
    assert png.format == 'PNG' and png.width > png.height
  assert [p.name for p in tmp_path.iterdir()] == ['pose.png']
