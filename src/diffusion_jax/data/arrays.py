"""`ArraySource`: examples held in memory as two arrays, served as read-only views."""

import numpy as np


class ArraySource:
    """source[i] -> {"image": images[i], "label": labels[i]}: uint8 (S, S, C) and int32."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int):
        images.flags.writeable = False
        labels.flags.writeable = False
        self._images, self._labels, self.num_classes = images, labels, num_classes

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": self._labels[index]}
