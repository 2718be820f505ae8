"""Pydantic schemas for params.yaml: the one place where every key, its type and its range live.

`load_params(path)` validates the whole file (unknown keys are errors, so a typo never silently
falls back to a default) and raises `ParamsError` with one line per problem, naming the full key path.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import check_name, is_weights_file

# kdpipe's models (kdpipe/models/) and the libraries' (`tv/<torchvision name>`, `timm/<timm name>`)
ModelName = Annotated[str, AfterValidator(check_name)]


class Error(RuntimeError):
    """kdpipe's own errors about input a user can fix (data, checkpoints, training, export): the CLI prints
    one line and exits non-zero."""


class UsageError(Error):
    """A command's options that do not fit together (the CLI exits 2, as for a bad option)."""


class ParamsError(ValueError):
    """A params file that does not validate; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class Strict(BaseModel):
    # strict: YAML's '12' (a string) is not an int; ints stay valid where a float is expected
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- data -----------------------------------------------------------------------------------------
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


# --- training -------------------------------------------------------------------------------------
class Optim(Strict):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    # norm_and_bias: no weight decay on 1-D parameters (norm layers' weights and biases, every bias), as
    # timm-style trainers filter them (DIST's ImageNet recipe); none: every parameter decays
    no_decay: Literal["none", "norm_and_bias"] = "none"
    # the global batch `lr` is set for: another batch_size scales it linearly (Goyal et al. 2017, as the ImageNet
    # recipes: 0.1 per 256 images); null: `lr` as it is
    lr_batch: Optional[int] = Field(None, ge=1)
    # the lr of particular models, overriding `lr` (RepDistiller trains MobileNetV2 and the ShuffleNets,
    # as teachers or students, at 0.01 instead of 0.05)
    lr_by_model: dict[ModelName, float] = {}

    @field_validator("lr_by_model")
    @classmethod
    def _positive(cls, v: dict) -> dict:
        if any(lr <= 0 for lr in v.values()):
            raise ValueError("learning rates must be > 0")
        return v


class Schedule(Strict):
    milestones: list[float] = Field([0.5, 0.75], description="fractions of training where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions of training strictly between 0 and 1")
        return v


class CpuPin(Strict):
    """Same bits on every x86-64 machine: torch picks CPU kernels by instruction set (ATen's vectorised
    code, oneDNN's convolutions), and reductions split by thread count; both change the rounding."""

    cpu_isa: Literal["native", "avx2"] = "native"  # avx2: pin ATen and oneDNN to AVX2 kernels
    cpu_threads: Optional[int] = Field(None, ge=1)  # null: torch's default (the number of cores)


class Runtime(CpuPin):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA, off for CPU (exact fp32)
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA and a native-ISA CPU, off under cpu_isa avx2
    compile: bool = False
    sync_bn: bool = False  # under torchrun: SyncBatchNorm instead of per-rank BN statistics (CUDA only)
    workers: int = Field(2, ge=0, description="data: source stream: decoding processes (results do not depend on it)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class Recipe(Strict):
    """A named training recipe (e.g. he2016); a `teacher`/`student` section picks one with
    `recipe: NAME`, and any key the section sets itself overrides the recipe's."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    optim: Optim
    schedule: Schedule


class Train(Strict):
    recipe: Optional[str] = None  # the recipe this section was built from (already merged in)
    model: ModelName = "resnet20"
    # tv/ and timm/ models: null (the architecture's init), a weights name (torchvision's IMAGENET1K_V1,
    # DEFAULT, ...; timm's `pretrained` or a tag) or a state-dict file (.pth/.pt/.safetensors)
    weights: Optional[str] = None
    seed: int = Field(0, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    optim: Optim = Optim()
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError("schedule.warmup_epochs must be smaller than epochs")
        return self

    @property
    def lr(self) -> float:
        """The base learning rate of the model this section trains (`optim.lr_by_model` first), scaled to the
        global batch where `optim.lr_batch` says which batch it is set for."""
        lr = self.optim.lr_by_model.get(self.model, self.optim.lr)
        return lr if self.optim.lr_batch is None else lr * self.batch_size / self.optim.lr_batch


# --- evaluation -----------------------------------------------------------------------------------
class Evaluate(CpuPin):
    batch_size: int = Field(1000, ge=1)
    device: str = "auto"
    workers: int = Field(2, ge=0, description="data: source stream: decoding processes")


# --- deployment: `kdpipe quantize`, `kdpipe measure` -----------------------------------------------
class Quantize(Strict):
    """Post-training static INT8 of models/NAME.onnx with onnxruntime (QDQ, uint8 activations, int8 weights)."""

    calibration_images: int = Field(256, ge=1, description="training images (evaluation view) the activation "
                                                          "ranges are calibrated on; all of them where fewer")
    per_channel: bool = True  # one weight scale per output channel (false: one per tensor)
    reduce_range: bool = False  # 7-bit weights: for CPUs without VNNI, where 8-bit products can saturate
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # how activation ranges are chosen
    seed: int = Field(0, ge=0, description="draws the calibration images")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads of the fp32/INT8 test runs")


class Measure(Strict):
    """`kdpipe measure`: onnxruntime CPU latency and throughput of models/NAME.onnx files."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (inter-op 1, sequential)")
    warmup: int = Field(10, ge=0, description="untimed batch-1 runs first")
    runs: int = Field(100, ge=2, description="timed batch-1 runs: latency p50 and p95")
    batch_size: int = Field(32, ge=1, description="the batch of the images/s figure")


# --- distillation ---------------------------------------------------------------------------------
# loss = gamma * CE(student, labels) + alpha * KD(T) + beta * (feature term); defaults are the common
# CIFAR conventions (RepDistiller). A combination (`--method kd+at`) takes gamma from its first method,
# alpha and T from `kd` when it is included (else from the first method), and each method's beta.
RECIPE_KEYS = ("epochs", "batch_size", "optim", "schedule")  # a training section's keys a recipe sets


class MethodParams(Strict):
    # the student's training where this method's published figure used another recipe than the pipeline's
    # (e.g. Nesterov, no decay on norm weights and biases, batch, lr): keys of a training section
    # (epochs, batch_size, optim, schedule) merged over the `student` section's; {}: the student's recipe
    train: dict = {}

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{', '.join(map(str, unknown))}: not a recipe key (valid: {', '.join(RECIPE_KEYS)})")
        try:
            validate(_deep_merge(Train().model_dump(), v), Train)
        except ParamsError as e:
            raise ValueError("; ".join(e.lines)) from None
        return v


def logit_std_field():
    return Field(False, description="Sun et al. 2024: standardise both logits, (z - mean) / (1e-7 + std) per row, "
                                    "before this method's loss")


class KDParams(MethodParams):
    gamma: float = Field(0.1, ge=0)
    alpha: float = Field(0.9, ge=0)
    temperature: float = Field(4.0, gt=0)
    logit_std: bool = logit_std_field()


class FeatureParams(MethodParams):
    gamma: float = Field(1.0, ge=0)
    alpha: float = Field(0.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    beta: float = Field(1.0, ge=0)


class ATParams(FeatureParams):
    beta: float = Field(1000.0, ge=0)
    p: float = Field(2.0, gt=0)


class NSTParams(FeatureParams):
    beta: float = Field(50.0, ge=0)


class FSPParams(FeatureParams):
    beta: float = Field(1.0, ge=0, description="weight of the FSP term in single-stage mode (init_epochs: 0)")
    init_epochs: int = Field(30, ge=0, description="RepDistiller: 30 epochs of FSP pre-training, then CE alone; "
                                                   "0: kdpipe's single-stage variant, gamma*CE + beta*FSP")


class FitNetsParams(FeatureParams):
    beta: float = Field(100.0, ge=0)
    hint_layer: int = Field(2, ge=0, le=4, description="stage tap index (f0..f3; f0..f4 for VGG, ResNet-50, "
                                                        "MobileNetV2) of the hint (and guided) layer")
    regressor_kernel: Literal[1, 3] = Field(1, description="1: RepDistiller's ConvReg (1x1 for equal sizes); 3: 3x3")
    init_epochs: int = Field(0, ge=0, description="> 0: the paper's two-stage procedure (hint training first)")


# The methods RepDistiller benchmarks (defaults: its scripts/run_cifar_distill.sh) and DKD (mdistiller).
class SPParams(FeatureParams):
    beta: float = Field(3000.0, ge=0)


class CCParams(FeatureParams):
    beta: float = Field(0.02, ge=0)
    feat_dim: int = Field(128, ge=1, description="size of the linear embeddings")


class VIDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)


class RKDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)
    w_dist: float = Field(25.0, ge=0)
    w_angle: float = Field(50.0, ge=0)


class PKTParams(FeatureParams):
    beta: float = Field(30000.0, ge=0)


class ABParams(FeatureParams):
    beta: float = Field(1.0, ge=0, description="weight of the AB term in single-stage mode (init_epochs: 0)")
    margin: float = Field(1.0, gt=0, description="the activation-boundary margin")
    init_epochs: int = Field(30, ge=0, description="RepDistiller: 30 epochs of AB pre-training (connectors and "
                                                   "the student's features), then CE alone; 0: single-stage variant")


class FTParams(FeatureParams):
    beta: float = Field(200.0, ge=0)
    rate: float = Field(0.5, gt=0, le=1, description="factor channels = rate x the teacher's last-stage channels")
    p1: float = Field(2.0, gt=0, description="factor: channel mean of |f|^p1")
    p2: Literal[1, 2] = Field(1, description="1: mean absolute factor difference (the paper's L1); 2: squared")
    init_epochs: int = Field(30, ge=1, description="epochs training the paraphraser on the teacher "
                                                   "(RepDistiller: 30) before the student's main phase")


class CRDParams(FeatureParams):
    beta: float = Field(0.8, ge=0)
    feat_dim: int = Field(128, ge=1, description="size of the L2-normalised embeddings")
    nce_k: int = Field(16384, ge=1, description="negatives per sample")
    nce_t: float = Field(0.07, gt=0, description="temperature")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")


def beta_by_pair_field():
    """A weight per pair where a method's references tune it: "teacher->student": beta, used instead of `beta`
    when distilling that pair (mdistiller's DKD configs, ReviewKD's script); `Distill.for_pair` applies it."""
    return Field({}, description='"teacher->student": beta for that pair')


def check_pairs(v: dict[str, float]) -> dict[str, float]:
    for key, beta in v.items():
        t, _, s = key.partition("->")
        try:
            check_name(t), check_name(s)
        except ValueError:
            raise ValueError(f"key {key!r} is not 'teacher->student' with two model names") from None
        if beta < 0:
            raise ValueError(f"{key}: beta must be >= 0")
    return v


class DKDParams(FeatureParams):
    beta: float = Field(8.0, ge=0, description="weight of NCKD (mdistiller's BETA; per pair in its configs)")
    tckd: float = Field(1.0, ge=0, description="weight of TCKD (mdistiller's ALPHA)")
    warmup_epochs: int = Field(20, ge=0, description="DKD's weight ramps up linearly over these epochs")
    beta_by_pair: dict[str, float] = beta_by_pair_field()
    logit_std: bool = logit_std_field()
    _pairs = field_validator("beta_by_pair")(check_pairs)


class DISTParams(FeatureParams):
    beta: float = Field(2.0, ge=0, description="weight of the DIST term (the authors' kd_loss_weight)")
    temperature: float = Field(4.0, gt=0, description="DIST's tau (CIFAR 4, ImageNet 1)")
    inter: float = Field(1.0, ge=0, description="DIST's beta: weight of the inter-class relation")
    intra: float = Field(1.0, ge=0, description="DIST's gamma: weight of the intra-class relation")
    logit_std: bool = logit_std_field()


class CTKDParams(FeatureParams):
    gamma: float = Field(0.1, ge=0)
    beta: float = Field(0.9, ge=0, description="weight of KD at the curriculum temperature (CTKD's -a 0.9)")
    t_start: float = Field(1.0, gt=0, description="tau = t_start + t_end * sigmoid(T)")
    t_end: float = Field(20.0, gt=0)
    decay_max: float = Field(0.0, description="the gradient reversal's lambda: cosine from decay_max ...")
    decay_min: float = Field(-1.0, description="... to decay_min over the first decay_loops epochs, then flat")
    decay_loops: int = Field(10, ge=0)
    logit_std: bool = logit_std_field()


class ReviewKDParams(FeatureParams):
    beta: float = Field(5.0, ge=0, description="weight of the HCL term (mdistiller's REVIEWKD_WEIGHT for "
                                               "resnet32x4 -> resnet8x4; the authors' script per pair)")
    warmup_epochs: int = Field(20, ge=0, description="the weight ramps up linearly over these epochs")
    stu_preact: bool = Field(False, description="the student's taps before their last ReLU (mdistiller's "
                                                "ImageNet STU_PREACT); false: after it")
    beta_by_pair: dict[str, float] = beta_by_pair_field()
    _pairs = field_validator("beta_by_pair")(check_pairs)


class KDSVDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)
    k: int = Field(1, ge=1, description="the teacher's singular vectors kept (the student's: k + 3)")


class MLKDParams(FeatureParams):
    gamma: float = Field(0.1, ge=0, description="weight of CE on each of the two views (MLKD's CE_WEIGHT)")
    temperature: float = Field(4.0, gt=0, description="the first of MLKD's temperatures (T, 3, 5, 2, 6)")
    beta: float = Field(0.9, ge=0, description="weight of every alignment term (MLKD's KD_WEIGHT)")
    logit_std: bool = logit_std_field()


class OFDParams(FeatureParams):
    beta: float = Field(0.001, ge=0, description="weight of the OFD term (mdistiller's FEAT_WEIGHT; OFD's loss / 1000 "
                                                 "on CIFAR, / 10000 on ImageNet)")


class WTTMParams(FeatureParams):
    """zkxufo/TTM. Its code sets no WTTM default beyond the power (train_student.py:68 `--ttm_l` 1, i.e. KD at T 1)
    and CE's weight (train_student.py:60 `-r` 1); the loss weights come per run, and the paper lists them per pair
    in its appendix A.4. Here: the README's WTTM command (README.md:37-42: `--add wttm --ttm_l 0.2 -a 4`, WTTM at
    weight 4 beside CRD) for WTTM; its TTM command (README.md:18-23: `--distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0`,
    vgg13 -> vgg8) is `weighted: false, exponent: 0.1, beta: 45`."""

    beta: float = Field(4.0, ge=0, description="weight of the (W)TTM term (README.md:40-41: -a 4 for --add wttm)")
    exponent: float = Field(0.2, gt=0, description="the power transform of the teacher's probabilities, gamma = 1/T "
                                                   "(--ttm_l; README.md:40: 0.2 for WTTM, README.md:21: 0.1 for TTM)")
    weighted: bool = Field(True, description="WTTM (distiller_zoo/wttm.py:19, each sample's KL times sum p_t^gamma); "
                                             "false: TTM (distiller_zoo/ttm.py:19, the plain mean)")


class SDDParams(FeatureParams):
    """shicaiwei123/SDD-CVPR2024: the README's command (README.md:41: `train_origin.py --cfg
    configs/cifar100/sdd_dkd/res32x4_shuv1.yaml --M [1,2,4]`), SD-DKD with mdistiller's DKD defaults
    (mdistiller/engine/cfg.py:163-166) and train_origin.py:198's warm-up. Its per-pair configs
    (configs/cifar100/sdd_dkd/<pair>.yaml) set DKD.BETA 2.0 for resnet56->resnet20 and resnet110->resnet32, 6.0 for
    resnet32x4->mobilenetv2, vgg13->vgg8, vgg13->mobilenetv2, vgg13->shufflev1, wrn_40_2->wrn_16_2,
    wrn_40_2->wrn_40_1, wrn_40_2->mobilenetv2 (`beta_by_pair`), and its scripts run M [1,2] for
    resnet32x4->resnet8x4 and vgg13->vgg8 (teacher_resnet32x4.sh, teacher_vgg.sh). SD-KD (`base: kd`):
    mdistiller's KD, CE 0.1 and KD 0.9 at T 4 (cfg.py:61-64): `gamma: 0.1, beta: 0.9`, no warm-up (KD.py:142)."""

    base: Literal["kd", "dkd"] = Field("dkd", description="the loss per region: KD (SD-KD) or DKD (SD-DKD, the "
                                                          "README's command)")
    gamma: float = Field(1.0, ge=0, description="CE's weight (cfg.py:163 DKD.CE_WEIGHT; SD-KD's: 0.1)")
    temperature: float = Field(4.0, gt=0, description="cfg.py:166 DKD.T (and :61 KD.TEMPERATURE)")
    beta: float = Field(8.0, ge=0, description="base dkd: NCKD's weight (cfg.py:165 DKD.BETA); base kd: the "
                                               "SD-KD term's weight (cfg.py:64 KD_WEIGHT 0.9)")
    tckd: float = Field(1.0, ge=0, description="base dkd: TCKD's weight (cfg.py:164 DKD.ALPHA)")
    warmup_epochs: int = Field(20, ge=0, description="base dkd: the loss ramps up linearly over these epochs "
                                                     "(train_origin.py:198 --warmup 20)")
    levels: list[int] = Field([1, 2, 4], description="the scales M: [1, 2, 4], [1, 2] or [1] (README.md:41 --M)")
    complementary_weight: float = Field(2.0, ge=0, description="the weight of the complementary regions' losses "
                                                               "(SDD_DKD.py:114-115, KD.py:89-90), consistent: 1")
    beta_by_pair: dict[str, float] = beta_by_pair_field()
    _pairs = field_validator("beta_by_pair")(check_pairs)

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if v not in ([1, 2, 4], [1, 2], [1]):
            raise ValueError("must be [1, 2, 4], [1, 2] or [1] (SDD's M: the global region first)")
        return v


class RLDParams(FeatureParams):
    """zju-SWJ/RLD: its mdistiller/engine/cfg.py:180-185 (its configs/cifar100/rld/*.yaml set none of these) and the
    README's RLD command (README.md:22: `--same-t RLD.ALPHA 1. RLD.BETA 8. RLD.T 4.`). Its ImageNet configs
    (configs/imagenet/*/rld.yaml) use T 1, warm-up 1 and BETA 0.5 (ResNet-34 -> 18) or 2.0 (ResNet-50 -> MobileNetV1)."""

    beta: float = Field(8.0, ge=0, description="weight of MCD, the masked correlation KL (cfg.py:182 RLD.BETA)")
    scd: float = Field(1.0, ge=0, description="weight of SCD, the sample confidence KL (cfg.py:181 RLD.ALPHA)")
    temperature: float = Field(4.0, gt=0, description="MCD's temperature (cfg.py:184 RLD.T)")
    scd_temperature: Optional[float] = Field(None, gt=0, description="SCD's temperature (RLD.ALPHA_T); null: "
                                             "`temperature`, the README's `--same-t` (tools/train.py:191-192)")
    warmup_epochs: int = Field(20, ge=0, description="the loss ramps up linearly over these epochs (cfg.py:185)")
    beta_by_pair: dict[str, float] = beta_by_pair_field()
    logit_std: bool = logit_std_field()
    _pairs = field_validator("beta_by_pair")(check_pairs)


class WKDParams(FeatureParams):
    """JiamingLv/WKD, its CIFAR-100 configs for ResNet-32x4 -> ResNet-8x4 (line numbers of configs/cifar100/...):
    WKD-L from wkd_l/res32x4_res8x4.yaml, WKD-F's shape from wkd_f/res32x4_res8x4.yaml (its weight 0.08 there;
    WKD-L+F: wkd_lf/, logit weight 200, feature 0.08, MEAN_COV_RATIO 8). WRN-40-2 -> ShuffleNetV1: WKD-L weight 200 at
    T 6 (wkd_l/wrn40_2_shuv1.yaml:23,32), WKD-F 0.3 with ratio 3 on a 4x4 grid (wkd_f/wrn40_2_shuv1.yaml:24,28,30).
    The configs' cost is COST_MATRIX 'cka' (a file computed offline from the teacher's per-class features over the
    training set, tools/generate_cost_matrix.py); kdpipe uses the code's other cost, COST_MATRIX 'fc' (WKD.py:142-148):
    1 - cosine of the teacher's classifier rows."""

    beta: float = Field(600.0, ge=0, description="weight of WKD-L's Wasserstein distance (WKD_LOGIT_WEIGHT, "
                                                 "wkd_l/res32x4_res8x4.yaml:23); 0: no WKD-L")
    temperature: float = Field(8.0, gt=0, description="WKD-L's temperature (res32x4_res8x4.yaml:32)")
    sinkhorn_lambda: float = Field(0.05, gt=0, description="Sinkhorn's entropic regularisation (yaml:27)")
    sinkhorn_iters: int = Field(10, ge=1, description="Sinkhorn's iterations (yaml:28)")
    cost_sharpen: float = Field(1.0, ge=0, description="cost = 1 - exp(-s * (1 - cos)); 0: 1 - cos (yaml:31)")
    decay_start: int = Field(150, ge=0, description="the weights decay along a cosine after this epoch "
                                                    "(COSINE_DECAY_EPOCH, yaml:25; the code's default 0) ...")
    decay_end: int = Field(240, ge=1, description="... to 0 at this one (the run's SOLVER.EPOCHS, yaml:12)")
    feat_weight: float = Field(0.0, ge=0, description="weight of WKD-F (WKD_FEAT_WEIGHT: 0 in wkd_l/, 0.08 in "
                                                      "wkd_f/res32x4_res8x4.yaml:24); 0: no WKD-F")
    hint_layer: int = Field(-1, ge=-5, le=4, description="WKD-F's stage tap (HINT_LAYER -1: the last)")
    projector: Literal["conv1x1", "bottleneck"] = Field("conv1x1", description="WKD-F's regressor: RepDistiller's "
                                                        "ConvReg (CIFAR's PROJECTOR) or the code's bottleneck (its default)")
    mean_cov_ratio: float = Field(4.0, ge=0, description="WKD-F: weight of the means' term (wkd_f/res32x4_res8x4.yaml:28)")
    grid: int = Field(1, ge=1, description="WKD-F: the maps split into grid x grid cells (SPATIAL_GRID, yaml:30)")
    eps: float = Field(1e-5, gt=0, description="WKD-F: sigma = sqrt(var + eps) (EPS, yaml:26)")
    beta_by_pair: dict[str, float] = beta_by_pair_field()
    _pairs = field_validator("beta_by_pair")(check_pairs)

    @model_validator(mode="after")
    def _decay(self):
        if self.decay_end <= self.decay_start:
            raise ValueError("decay_end must be after decay_start")
        return self


class DOTParams(MethodParams):
    """KD+DOT on its own; with other methods only `delta` counts (gamma, alpha, T come from the first method)."""

    gamma: float = Field(0.1, ge=0)
    alpha: float = Field(0.9, ge=0)
    temperature: float = Field(4.0, gt=0)
    delta: float = Field(0.075, ge=0, description="task momentum = optim.momentum - delta, distillation "
                                                  "momentum = optim.momentum + delta")
    logit_std: bool = logit_std_field()


class Distill(Strict):
    kd: KDParams = KDParams()
    at: ATParams = ATParams()
    nst: NSTParams = NSTParams()
    fsp: FSPParams = FSPParams()
    fitnets: FitNetsParams = FitNetsParams()
    sp: SPParams = SPParams()
    cc: CCParams = CCParams()
    vid: VIDParams = VIDParams()
    rkd: RKDParams = RKDParams()
    pkt: PKTParams = PKTParams()
    ab: ABParams = ABParams()
    ft: FTParams = FTParams()
    crd: CRDParams = CRDParams()
    dkd: DKDParams = DKDParams()
    dist: DISTParams = DISTParams()
    ctkd: CTKDParams = CTKDParams()
    reviewkd: ReviewKDParams = ReviewKDParams()
    mlkd: MLKDParams = MLKDParams()
    ofd: OFDParams = OFDParams()
    kdsvd: KDSVDParams = KDSVDParams()
    dot: DOTParams = DOTParams()
    wttm: WTTMParams = WTTMParams()
    sdd: SDDParams = SDDParams()
    wkd: WKDParams = WKDParams()
    rld: RLDParams = RLDParams()

    def for_pair(self, teacher: str, student: str) -> "Distill":
        """These params with the per-pair weights of `teacher -> student` applied (DKD's, ReviewKD's beta)."""
        pair, update = f"{teacher}->{student}", {}
        for name in type(self).model_fields:
            cfg = getattr(self, name)
            if pair in getattr(cfg, "beta_by_pair", {}):
                update[name] = cfg.model_copy(update={"beta": cfg.beta_by_pair[pair]})
        return self.model_copy(update=update) if update else self


# the methods: one params schema each above, one file each in kdpipe/distill/ (a test ties the two)
METHODS = tuple(Distill.model_fields)


def parse_methods(spec: str) -> list[str]:
    """`kd+at` -> ["kd", "at"], with a clear error for unknown or repeated names."""
    names = [m.strip() for m in spec.split("+")]
    if "" in names:
        raise ParamsError([f"--method: {spec!r} has an empty term; valid: {', '.join(METHODS)} (combine with +, e.g. kd+at)"])
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ParamsError([f"--method: unknown method {', '.join(map(repr, unknown)) or repr(spec)}; "
                           f"valid: {', '.join(METHODS)} (combine with +, e.g. kd+at)"])
    if len(set(names)) != len(names):
        raise ParamsError([f"--method: {spec!r} names a method twice"])
    return names


def parse_run(spec: str, variants: dict) -> tuple[list[str], Optional[str]]:
    """`--method`: methods combined with +, the last term optionally a tag of `variants` (`kd+ls`, `dkd+ls`):
    the methods and the tag (None without one). The tag must define each of the methods."""
    *head, last = spec.split("+")
    if head and last in variants:
        methods = parse_methods("+".join(head))
        missing = [m for m in methods if m not in variants[last]]
        if missing:
            raise ParamsError([f"--method: {spec!r}: variants.{last} defines no {', '.join(missing)} "
                               f"(it has: {', '.join(variants[last]) or 'none'})"])
        return methods, last
    return parse_methods(spec), None


class Pair(Strict):
    teacher: ModelName
    student: ModelName


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(d: dict, prefix: tuple = ()) -> dict:
    """{(key, subkey, ...): value} of a nested mapping (tuple paths: model names may hold dots)."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) and v else {prefix + (k,): v})
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for (*parents, leaf), v in flat.items():
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return out


TRAIN_SECTIONS = ("teacher", "student", "table")  # the sections that train a model (a recipe each)


class Params(Strict):
    data: Data = Data()
    recipes: dict[str, Recipe] = {}
    teacher: Train = Train(model="resnet56")
    student: Train = Train(model="resnet20")
    table: Train = Train()  # the full pipelines' `table@` stages: the ResNet table (He et al.'s recipe)
    distill: Distill = Distill()
    evaluate: Evaluate = Evaluate()
    quantize: Quantize = Quantize()  # `kdpipe quantize` (optional: these defaults)
    measure: Measure = Measure()  # `kdpipe measure` (optional: these defaults)
    # the grid of the full pipelines (pipelines/cifar10, cifar100, imagenet)
    # the command their training stages run: kdpipe, or kdpipe under torchrun for DDP on several GPUs
    # (`torchrun --nproc-per-node 8 -m kdpipe`); the global batch_size and lr stay the params' (runtime.py)
    launch: str = "kdpipe"
    table_models: list[ModelName] = []  # trained from scratch with `table`: the ResNet table's figures
    models: list[ModelName] = []  # trained from scratch with `teacher`: the benchmark's teachers and baselines
    published: list[ModelName] = []  # teachers imported from published/<model>.pth (RepDistiller/mdistiller)
    seeds: list[int] = [0]
    methods: list[Literal[METHODS]] = list(METHODS)  # type: ignore[valid-type]
    pairs: list[Pair] = []
    # named variants of methods, each a row `<method>+<tag>` of its own in the grid (`--method kd+ls`):
    # tag -> method -> keys of distill.<method> it sets, and `by_pair: {"teacher->student": {key: value}}`
    # where the variant's references tune a key per pair (logit-standardization-KD's "+LS" rows)
    variants: dict[str, dict[str, dict]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_recipes(cls, raw):
        if not isinstance(raw, dict):
            return raw
        recipes = raw.get("recipes") or {}
        out = dict(raw)
        for role in TRAIN_SECTIONS:
            section = raw.get(role)
            if isinstance(section, dict) and section.get("recipe") is not None:
                name = section["recipe"]
                if not isinstance(recipes, dict) or name not in recipes:
                    defined = ", ".join(recipes) if isinstance(recipes, dict) and recipes else "none"
                    raise ValueError(f"{role}.recipe: unknown recipe {name!r} (defined in recipes: {defined})")
                if isinstance(recipes[name], dict):
                    out[role] = _deep_merge(recipes[name], section)
        return out

    def student_for(self, methods: list[str]) -> Train:
        """The `student` section with the `train` overrides of `methods` merged in: the recipe a distillation
        with these methods runs (its `recipe` names the student's, + the methods whose own recipe it is)."""
        over: dict = {}
        for m in methods:
            for key, value in _flat(getattr(self.distill, m).train).items():
                if key in over and over[key] != value:
                    raise ParamsError([f"distill.{m}.train.{'.'.join(key)}: {value!r}, but another method of the combination "
                                       f"sets {over[key]!r}"])
                over[key] = value
        if not over:
            return self.student
        own = [m for m in methods if getattr(self.distill, m).train]
        merged = _deep_merge(self.student.model_dump(), _nest(over))
        merged["recipe"] = f"{self.student.recipe or 'custom'}+{'+'.join(own)}"
        return Train.model_validate(merged)

    @model_validator(mode="after")
    def _check_variants(self):
        for tag, entries in self.variants.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", tag) or tag in METHODS:
                raise ValueError(f"variants.{tag}: a tag is a lower-case word that is not a method's name")
            for m, over in entries.items():
                if m not in METHODS:
                    raise ValueError(f"variants.{tag}.{m}: unknown method (valid: {', '.join(METHODS)})")
                by_pair = over.get("by_pair", {})
                if not isinstance(by_pair, dict) or any(not isinstance(v, dict) or "train" in v for v in by_pair.values()):
                    raise ValueError(f"variants.{tag}.{m}.by_pair: a mapping of 'teacher->student' to keys of "
                                     f"distill.{m} (not train: the recipe is the pair's for every pair)")
                for pair in [None, *by_pair]:
                    if pair is not None:
                        t, _, st = pair.partition("->")
                        try:
                            check_name(t), check_name(st)
                        except ValueError:
                            raise ValueError(f"variants.{tag}.{m}.by_pair: key {pair!r} is not 'teacher->student' "
                                             "with two model names") from None
                    self._method_params(tag, m, pair and tuple(pair.split("->")))
        return self

    def _method_params(self, tag: str, method: str, pair: Optional[tuple[str, str]] = None) -> BaseModel:
        """distill.<method> with variant `tag`'s keys set (and its `by_pair` keys of `pair`): keys replace the
        method's own, mappings included (DKD+LS's `beta_by_pair: {}` drops DKD's per-pair betas)."""
        base = getattr(self.distill, method)
        over = dict(self.variants[tag][method])
        by_pair = over.pop("by_pair", {})
        over.update(by_pair.get(f"{pair[0]}->{pair[1]}", {}) if pair else {})
        try:
            return type(base).model_validate({**base.model_dump(), **over})
        except ValidationError as e:
            raise ValueError("; ".join(f"variants.{tag}.{method}: {_describe(err, type(base))}" for err in e.errors())) from None

    def varied(self, tag: Optional[str], methods: list[str], pair: Optional[tuple[str, str]] = None) -> "Params":
        """These params with variant `tag` applied to the sections of `methods` it names (for `pair`, its
        per-pair keys too); `tag` None: these params."""
        if tag is None:
            return self
        update = {m: self._method_params(tag, m, pair) for m in methods if m in self.variants[tag]}
        return self.model_copy(update={"distill": self.distill.model_copy(update=update)})

    def rows(self) -> list[str]:
        """The grid's distillation rows: each of `methods`, then each variant `<method>+<tag>`."""
        return list(self.methods) + [f"{m}+{tag}" for tag, entries in self.variants.items() for m in entries]

    @field_validator("launch")
    @classmethod
    def _launch(cls, v: str) -> str:
        if v != "kdpipe" and not (v.startswith("torchrun ") and v.endswith(" -m kdpipe")):
            raise ValueError("must be kdpipe, or torchrun with its options followed by -m kdpipe")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("must be a non-empty list of distinct seeds >= 0")
        return v


# --- loading --------------------------------------------------------------------------------------
def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-after")))


def _schema_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The schema class that holds the key at `loc`, to suggest valid keys for a typo."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict, root: type[BaseModel]) -> str:
    loc = err["loc"]
    path = _key_path(loc)
    if err["type"] == "extra_forbidden":
        parent = _schema_at(root, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (f" (valid keys: {', '.join(valid)})" if valid else "")
        return f"{path}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return f"{path}: {msg}" if path else msg


def validate(raw: object, schema: type[BaseModel] = Params) -> BaseModel:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(["params file must be a mapping of sections (data, teacher, student, …)"])
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ParamsError([_describe(err, schema) for err in e.errors()]) from None


def load_params(path: str | Path = "params.yaml", require: tuple[str, ...] = ()) -> Params:
    """Validate the params file; every section in `require` (the ones the command reads) must be present,
    so an empty or truncated file never silently trains a built-in default."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError([f"{path}: params file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError([f"{path}: not valid YAML{where}: {what}"]) from None
    missing = [s for s in require if not (isinstance(raw, dict) and s in raw)]
    if missing:
        raise ParamsError([f"{path}: missing section {s!r} (this command reads it)" for s in missing])
    p = validate(raw)
    # files named in the params (data.path, a section's weights file) are relative to the params file's folder
    here = lambda f: f if Path(f).is_absolute() else os.path.normpath(path.parent / f)  # noqa: E731
    if p.data.path is not None:
        p = p.model_copy(update={"data": p.data.model_copy(update={"path": here(p.data.path)})})
    for role in TRAIN_SECTIONS:
        w = getattr(p, role).weights
        if w is not None and is_weights_file(w):
            p = p.model_copy(update={role: getattr(p, role).model_copy(update={"weights": here(w)})})
    return p
