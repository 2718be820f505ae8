"""The deployment sections: `quantize` (`kdpipe quantize`), `qat` (`kdpipe qat`) and `measure` (`kdpipe measure`)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from .base import Strict


class Quantize(Strict):
    """Post-training static INT8 of models/NAME.onnx with onnxruntime (QDQ, uint8 activations, int8 weights)."""

    calibration_images: int = Field(256, ge=1, description="training images (evaluation view) the activation "
                                                          "ranges are calibrated on; all of them where fewer")
    per_channel: bool = True  # one weight scale per output channel (false: one per tensor)
    # 7-bit weights, for CPUs without VNNI, where u8 x s8 products can saturate; auto: on where the CPU has no VNNI
    reduce_range: Union[bool, Literal["auto"]] = "auto"
    max_drop: float = Field(1.0, ge=0, description="the most Top-1 (points) INT8 may lose on held-out training "
                                                   "images; beyond, layers fall back to fp32 until it holds")
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # how activation ranges are chosen
    seed: int = Field(0, ge=0, description="draws the calibration images")
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads of the fp32/INT8 test runs")


class Qat(Strict):
    """`kdpipe qat NAME`: quantization-aware fine-tuning of a distilled student against the teacher (KD's loss,
    `distill.kd`'s settings; the student's recipe otherwise), INT8 as `quantize` makes it."""

    epochs: int = Field(2, ge=1, description="fine-tuning epochs under simulated INT8")
    lr: float = Field(0.001, gt=0, description="their learning rate (constant): a fine-tuning's, small")


class Measure(Strict):
    """`kdpipe measure`: onnxruntime CPU latency and throughput of models/NAME.onnx files."""

    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads (inter-op 1, sequential)")
    warmup: int = Field(10, ge=0, description="untimed batch-1 runs first")
    runs: int = Field(20, ge=2, description="timed batch-1 runs of each model in each round: latency p50 and p95")
    rounds: int = Field(5, ge=1, description="rounds over the models, interleaved: the spread of latency over rounds")
    batch_size: int = Field(32, ge=1, description="the batch of the images/s figure")
