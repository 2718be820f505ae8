"""params' `distill` section: one schema per method (the list of methods, `METHODS`, is `Distill`'s fields),
and `--method` parsing."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from .base import Strict, deep_merge, pair_key
from .errors import ParamsError, describe
from .train import Train

# loss = gamma * CE(student, labels) + alpha * KD(T) + beta * (feature term); defaults are the common
# CIFAR conventions (RepDistiller). A combination (`--method kd+at`) takes gamma from its first method,
# alpha and T from `kd` when it is included (else from the first method), and each method's beta.
RECIPE_KEYS = ("epochs", "batch_size", "optim", "schedule")  # a training section's keys a recipe sets


class MethodParams(Strict):
    # the student's training where this method's published figure used another recipe than the pipeline's
    # (e.g. Nesterov, no decay on norm weights and biases, batch, lr): keys of a training section
    # (epochs, batch_size, optim, schedule) merged over the `student` section's; {}: the student's recipe
    train: dict = {}
    # keys of this method set per pair where its references tune them (mdistiller's DKD configs, WKD's, SDD's):
    # "teacher->student": {key: value}, any key but train (the recipe, chosen before the pair is known) and by_pair;
    # `for_pair` applies them, and they are validated as the method's own
    by_pair: dict[str, dict] = {}

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict) -> dict:
        unknown = sorted(set(v) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{', '.join(map(str, unknown))}: not a recipe key (valid: {', '.join(RECIPE_KEYS)})")
        try:
            Train.model_validate(deep_merge(Train().model_dump(), v))
        except ValidationError as e:
            raise ValueError("; ".join(describe(err, Train) for err in e.errors())) from None
        return v

    @model_validator(mode="after")
    def _by_pair(self):
        for key, keys in self.by_pair.items():
            try:
                pair_key(key)
            except ValueError as e:
                raise ValueError(f"by_pair: {e}") from None
            wrong = sorted(k for k in keys if k in ("train", "by_pair") or k not in type(self).model_fields)
            if wrong:
                raise ValueError(f"by_pair.{key}: {', '.join(map(str, wrong))}: not a key this method sets per pair "
                                 f"(any of its keys but train and by_pair)")
            self._with(keys, f"by_pair.{key}")
        return self

    def _with(self, keys: dict, where: str):
        try:
            return type(self).model_validate({**self.model_dump(exclude={"by_pair"}), **keys})
        except ValidationError as e:
            raise ValueError("; ".join(f"{where}: {describe(err, type(self))}" for err in e.errors())) from None

    def for_pair(self, teacher: str, student: str):
        """This method's params for `teacher -> student`: its `by_pair` keys of that pair set, `by_pair` emptied
        (what the run records is what it used)."""
        return self._with(self.by_pair.get(f"{teacher}->{student}", {}), f"by_pair.{teacher}->{student}")


def epoch_count(default: int, **kw):
    """A key counted in epochs of the run (a warm-up, an init stage, a decay's epochs): set for the published
    recipe's 240 CIFAR epochs, scaled with the run where `kdpipe init` writes it (`epoch_keys`)."""
    return Field(default, json_schema_extra={"epoch_count": True}, **kw)


def epoch_keys(params: type[MethodParams]) -> list[str]:
    """The keys of a method's params counted in epochs."""
    return [n for n, f in params.model_fields.items() if (f.json_schema_extra or {}).get("epoch_count")]


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
    init_epochs: int = epoch_count(30, ge=0, description="RepDistiller: 30 epochs of FSP pre-training, then CE alone; "
                                                   "0: kdpipe's single-stage variant, gamma*CE + beta*FSP")


class FitNetsParams(FeatureParams):
    beta: float = Field(100.0, ge=0)
    hint_layer: int = Field(2, ge=0, le=4, description="stage tap index (f0..f3; f0..f4 for VGG, ResNet-50, "
                                                        "MobileNetV2) of the hint (and guided) layer")
    regressor_kernel: Literal[1, 3] = Field(1, description="1: RepDistiller's ConvReg (1x1 for equal sizes); 3: 3x3")
    init_epochs: int = epoch_count(0, ge=0, description="> 0: the paper's two-stage procedure (hint training first)")


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
    init_epochs: int = epoch_count(30, ge=0, description="RepDistiller: 30 epochs of AB pre-training (connectors and "
                                                   "the student's features), then CE alone; 0: single-stage variant")


class FTParams(FeatureParams):
    beta: float = Field(200.0, ge=0)
    rate: float = Field(0.5, gt=0, le=1, description="factor channels = rate x the teacher's last-stage channels")
    p1: float = Field(2.0, gt=0, description="factor: channel mean of |f|^p1")
    p2: Literal[1, 2] = Field(1, description="1: mean absolute factor difference (the paper's L1); 2: squared")
    init_epochs: int = epoch_count(30, ge=1, description="epochs training the paraphraser on the teacher "
                                                   "(RepDistiller: 30) before the student's main phase")


class CRDParams(FeatureParams):
    beta: float = Field(0.8, ge=0)
    feat_dim: int = Field(128, ge=1, description="size of the L2-normalised embeddings")
    nce_k: int = Field(16384, ge=1, description="negatives per sample")
    nce_t: float = Field(0.07, gt=0, description="temperature")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")


class DKDParams(FeatureParams):
    beta: float = Field(8.0, ge=0, description="weight of NCKD (mdistiller's BETA; per pair in its configs)")
    tckd: float = Field(1.0, ge=0, description="weight of TCKD (mdistiller's ALPHA)")
    warmup_epochs: int = epoch_count(20, ge=0, description="DKD's weight ramps up linearly over these epochs")
    logit_std: bool = logit_std_field()


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
    decay_loops: int = epoch_count(10, ge=0)
    logit_std: bool = logit_std_field()


class ReviewKDParams(FeatureParams):
    beta: float = Field(5.0, ge=0, description="weight of the HCL term (mdistiller's REVIEWKD_WEIGHT for "
                                               "resnet32x4 -> resnet8x4; the authors' script per pair)")
    warmup_epochs: int = epoch_count(20, ge=0, description="the weight ramps up linearly over these epochs")
    stu_preact: bool = Field(False, description="the student's taps before their last ReLU (mdistiller's "
                                                "ImageNet STU_PREACT); false: after it")


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
    wrn_40_2->wrn_40_1, wrn_40_2->mobilenetv2 (`by_pair`), and its scripts run M [1,2] for
    resnet32x4->resnet8x4 and vgg13->vgg8 (teacher_resnet32x4.sh, teacher_vgg.sh). SD-KD (`base: kd`):
    mdistiller's KD, CE 0.1 and KD 0.9 at T 4 (cfg.py:61-64): `gamma: 0.1, beta: 0.9`, no warm-up (KD.py:142)."""

    base: Literal["kd", "dkd"] = Field("dkd", description="the loss per region: KD (SD-KD) or DKD (SD-DKD, the "
                                                          "README's command)")
    gamma: float = Field(1.0, ge=0, description="CE's weight (cfg.py:163 DKD.CE_WEIGHT; SD-KD's: 0.1)")
    temperature: float = Field(4.0, gt=0, description="cfg.py:166 DKD.T (and :61 KD.TEMPERATURE)")
    beta: float = Field(8.0, ge=0, description="base dkd: NCKD's weight (cfg.py:165 DKD.BETA); base kd: the "
                                               "SD-KD term's weight (cfg.py:64 KD_WEIGHT 0.9)")
    tckd: float = Field(1.0, ge=0, description="base dkd: TCKD's weight (cfg.py:164 DKD.ALPHA)")
    warmup_epochs: int = epoch_count(20, ge=0, description="base dkd: the loss ramps up linearly over these epochs "
                                                     "(train_origin.py:198 --warmup 20)")
    levels: list[int] = Field([1, 2, 4], description="the scales M: [1, 2, 4], [1, 2] or [1] (README.md:41 --M)")
    complementary_weight: float = Field(2.0, ge=0, description="the weight of the complementary regions' losses "
                                                               "(SDD_DKD.py:114-115, KD.py:89-90), consistent: 1")

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
    warmup_epochs: int = epoch_count(20, ge=0, description="the loss ramps up linearly over these epochs (cfg.py:185)")
    logit_std: bool = logit_std_field()


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
    decay_start: int = epoch_count(150, ge=0, description="the weights decay along a cosine after this epoch "
                                                    "(COSINE_DECAY_EPOCH, yaml:25; the code's default 0) ...")
    decay_end: int = epoch_count(240, ge=1, description="... to 0 at this one (the run's SOLVER.EPOCHS, yaml:12)")
    feat_weight: float = Field(0.0, ge=0, description="weight of WKD-F (WKD_FEAT_WEIGHT: 0 in wkd_l/, 0.08 in "
                                                      "wkd_f/res32x4_res8x4.yaml:24); 0: no WKD-F")
    hint_layer: int = Field(-1, ge=-5, le=4, description="WKD-F's stage tap (HINT_LAYER -1: the last)")
    projector: Literal["conv1x1", "bottleneck"] = Field("conv1x1", description="WKD-F's regressor: RepDistiller's "
                                                        "ConvReg (CIFAR's PROJECTOR) or the code's bottleneck (its default)")
    mean_cov_ratio: float = Field(4.0, ge=0, description="WKD-F: weight of the means' term (wkd_f/res32x4_res8x4.yaml:28)")
    grid: int = Field(1, ge=1, description="WKD-F: the maps split into grid x grid cells (SPATIAL_GRID, yaml:30)")
    eps: float = Field(1e-5, gt=0, description="WKD-F: sigma = sqrt(var + eps) (EPS, yaml:26)")

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
        """These params with each method's `by_pair` keys of `teacher -> student` applied."""
        return self.model_copy(update={m: getattr(self, m).for_pair(teacher, student) for m in type(self).model_fields})


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
