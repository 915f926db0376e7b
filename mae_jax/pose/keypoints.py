"""COCO person keypoints: the 17 joints in COCO order, the left/right pairs
swapped by a horizontal flip, the skeleton drawn between them and the
per-joint OKS sigmas of the COCO keypoint evaluation (pycocotools)."""

KEYPOINT_NAMES = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear',
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle',
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# (left, right) joint indices exchanged by mirroring the image.
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
              (15, 16))

# Limbs as 0-based joint index pairs (COCO's 1-based skeleton minus one).
SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12),
    (5, 6), (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2),
    (1, 3), (2, 4), (3, 5), (4, 6),
)

# OKS sigma per joint, COCO order (pycocotools' values / 10).
OKS_SIGMAS = tuple(s / 10.0 for s in (
    .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
    .87, .87, .89, .89))
