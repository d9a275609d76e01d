"""Published top-1 / top-5 validation errors (%) that the reports put next to ours.

Simonyan & Zisserman, ICLR 2015 (arXiv:1409.1556), Tables 3-5; torchvision's retrained weights' published
accuracies (https://pytorch.org/vision/stable/models/vgg.html).
Keys use the paper's configuration letters and training-scale labels ('256', '384', '256-512').
"""

from __future__ import annotations

# Table 3: single test scale Q (Q = S for fixed S, Q = 384 for S in [256, 512]).
# (net, train scale) -> (test Q, top-1, top-5)
TABLE3: dict[tuple[str, str], tuple[int, float, float]] = {
    ("A", "256"): (256, 29.6, 10.4),
    ("A-LRN", "256"): (256, 29.7, 10.5),
    ("B", "256"): (256, 28.7, 9.9),
    ("C", "256"): (256, 28.1, 9.4),
    ("C", "384"): (384, 28.1, 9.3),
    ("C", "256-512"): (384, 27.3, 8.8),
    ("D", "256"): (256, 27.0, 8.8),
    ("D", "384"): (384, 26.8, 8.7),
    ("D", "256-512"): (384, 25.6, 8.1),
    ("E", "256"): (256, 27.3, 9.0),
    ("E", "384"): (384, 26.9, 8.7),
    ("E", "256-512"): (384, 25.5, 8.0),
}

# Tables 4 and 5: several test scales (Q = {256, 384, 512} for jittered training).
# (net, train scale, protocol) -> (top-1, top-5); Table 5's dense rows repeat Table 4.
MULTI_SCALE: dict[tuple[str, str, str], tuple[float, float]] = {
    ("D", "256-512", "dense"): (24.8, 7.5),
    ("E", "256-512", "dense"): (24.8, 7.5),
    ("D", "256-512", "multicrop"): (24.6, 7.5),
    ("E", "256-512", "multicrop"): (24.6, 7.4),
    ("D", "256-512", "dense+multicrop"): (24.4, 7.2),
    ("E", "256-512", "dense+multicrop"): (24.4, 7.1),
}

# torchvision's retrained weights, single 224 centre crop of the image rescaled to 256:
# model name -> (top-1, top-5) error, from the published accuracies (100 - acc).
TORCHVISION_CENTRE_CROP: dict[str, tuple[float, float]] = {
    name: (round(100 - top1, 3), round(100 - top5, 3))
    for name, (top1, top5) in {
        "vgg11": (69.020, 88.628),
        "vgg13": (69.928, 89.246),
        "vgg16": (71.592, 90.382),
        "vgg19": (72.376, 90.876),
        "vgg11_bn": (70.370, 89.810),
        "vgg13_bn": (71.586, 90.374),
        "vgg16_bn": (73.360, 91.516),
        "vgg19_bn": (74.218, 91.842),
    }.items()
}
