"""params' `data` section: which dataset, where from, at what size and how it is augmented."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import Strict


class Synthetic(Strict):
    num_classes: int = Field(10, ge=2, le=100)
    train_size: int = Field(5000, ge=10)
    test_size: int = Field(1000, ge=10)
    seed: int = Field(0, ge=0)


FOLDER_DATASETS = ("folder", "imagenet")  # the datasets read from an image folder (`path`)


class Data(Strict):
    dataset: Literal["synthetic", "cifar10", "cifar100", "folder", "imagenet"] = "synthetic"
    mirror: Optional[str] = None  # base URL of the CIFAR archives; env KDPIPE_CIFAR_MIRROR wins
    # dataset folder: folder: train/<class>/* and test/<class>/*; imagenet: ILSVRC2012 as torchvision's
    # ImageFolder reads it, train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
    path: Optional[str] = None
    # imagenet: the folder is a subset on purpose (ILSVRC2012's class and image counts are not checked)
    subset: bool = False
    synthetic: Synthetic = Synthetic()
    image_size: int = Field(32, ge=8, le=1024, description="side of the square images the models see")
    # cifar: pad-4 random crop + flip at image_size; imagenet: torchvision's reference recipe
    # (RandomResizedCrop(image_size, scale 0.08-1) + flip; test: shorter side to image_size / 0.875, centre crop)
    augment: Literal["cifar", "imagenet"] = "cifar"
    # the inputs' mean/std: the training set's own, or ImageNet's (what torchvision's/timm's pretrained weights saw)
    normalize: Literal["dataset", "imagenet"] = "dataset"
    # memory: decoded uint8 arrays held on the training device (CIFAR-sized data); stream: the image files,
    # decoded and augmented per epoch by DataLoader workers (data larger than memory; dataset: folder)
    source: Literal["memory", "stream"] = "memory"

    @model_validator(mode="after")
    def _folder_needs_path(self):
        if (self.dataset in FOLDER_DATASETS) != (self.path is not None):
            raise ValueError("path is required for dataset: folder and imagenet (and only used there)")
        if self.source == "stream" and self.dataset not in FOLDER_DATASETS:
            raise ValueError(f"source: stream reads image files (dataset: folder, imagenet); {self.dataset} is held in memory")
        if self.dataset == "imagenet" and self.source != "stream":
            raise ValueError("dataset: imagenet is read from its files (source: stream), never decoded whole")
        if self.subset and self.dataset != "imagenet":
            raise ValueError("subset is for dataset: imagenet (whose counts are checked otherwise)")
        return self


class Manifest(BaseModel):
    """data/prepared/manifest.json as `kdpipe data` writes it (kdpipe/prepare.py), read back typed: what every
    later stage knows of the data without loading it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dataset: str
    source: str  # where the data came from: the archive's URL, the folder, "kdpipe synthetic (seed N)"
    num_classes: int
    classes: list[str]
    train_size: int
    test_size: int
    image_size: int  # the side of the square images the models see
    augment: Literal["cifar", "imagenet"]
    storage: Literal["memory", "stream"]  # data.source: arrays, or the image files listed in samples.json
    mean: list[float]  # per channel, for 0..1 pixels
    std: list[float]
    sha256: dict[str, str]  # per prepared file: the arrays (memory) or samples.json (stream)
    class_counts: Optional[dict[str, dict[str, int]]] = None  # folder datasets: images per class and split
    resized: Optional[int] = None  # folder datasets held in memory: images resized to image_size

    @property
    def normalization(self) -> dict:
        return {"mean": self.mean, "std": self.std}
