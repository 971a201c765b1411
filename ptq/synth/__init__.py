"""Zero-shot calibration data: images synthesized from a pretrained model's BatchNorm statistics."""

from ptq.synth.run import synthesize
from ptq.synth.shards import SyntheticSet
from ptq.synth.synthesizer import SynthError, Synthesizer, class_statistics

__all__ = ["SynthError", "SyntheticSet", "Synthesizer", "class_statistics", "synthesize"]
