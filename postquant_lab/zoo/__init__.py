"""Named float models with their data and preprocessing: ``load_model("resnet20-cifar10")``."""

from postquant_lab.zoo.checkpoint import load_state_dict, load_weights, read_checkpoint
from postquant_lab.zoo.datasets import (
    CIFAR10_PREPROCESS,
    MNIST_PREPROCESS,
    EvalData,
    ImagePreprocess,
    Normalize,
    Preprocess,
    SentencePair,
    TextPreprocess,
    efficientnet_lite_preprocess,
    imagenet_preprocess,
)
from postquant_lab.zoo.registry import list_models, load_model
from postquant_lab.zoo.zoo_model import Task, ZooModel

__all__ = [
    "CIFAR10_PREPROCESS",
    "MNIST_PREPROCESS",
    "EvalData",
    "ImagePreprocess",
    "Normalize",
    "Preprocess",
    "SentencePair",
    "Task",
    "TextPreprocess",
    "ZooModel",
    "efficientnet_lite_preprocess",
    "imagenet_preprocess",
    "list_models",
    "load_model",
    "load_state_dict",
    "load_weights",
    "read_checkpoint",
]
