"""Top-down human pose estimation with ViTPose (Xu et al., *ViTPose: Simple
Vision Transformer Baselines for Human Pose Estimation*, 2022,
arXiv:2204.12484): one crop per person box, one heatmap per joint, the
UDP-unbiased crop and DARK-UDP decoding of the official code
(ViTAE-Transformer/ViTPose, built on mmpose).

`keypoints` holds the COCO joint constants, `topdown` the person crops that
become model inputs, `decode` heatmaps -> image keypoints, `estimate` the
inference of one image, `figure` the drawings (matplotlib, extra `viz`);
`layout` and `convert` the checkpoint layouts. Training: `coco` the
annotation files, `synthetic` the generated keypoint set, `augment` the
random training samples, `targets` the UDP heatmap targets and the loss,
`data` the batches, `metrics` OKS AP and PCK.
"""
