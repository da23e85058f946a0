"""Evaluation kit shared by the model cards: plain metric functions and the ``python -m training.eval`` CLI.

``training.eval.metrics`` holds array-only metrics (no model needed); ``training.eval.faces`` the metrics that use
the runtime's face input and identity network. ``training.eval.dlib_reference`` wraps dlib (dev/eval only).
"""

from training.eval.metrics import (distinct_neighbour_rate, frechet_distance, mask_iou, mean_cross_cosine,
                                   pairwise_cosine, pose_error, psnr)

__all__ = ["distinct_neighbour_rate", "frechet_distance", "mask_iou", "mean_cross_cosine", "pairwise_cosine",
           "pose_error", "psnr"]
