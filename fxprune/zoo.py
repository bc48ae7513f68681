"""Models users ship, built with random weights from configs (nothing downloaded), by family.

For the coverage benchmark (``benchmarks/coverage_families.py``) and the tests. Each builder returns
``(model, example_inputs)`` with the model in eval mode; ``example_inputs`` is what ``fxprune.compile``
takes (a tuple of positional inputs, or a dict of keyword inputs). The packages of each family
(transformers, ultralytics, segmentation_models_pytorch, timm) are imported only when a builder of that
family runs: they are optional (the ``models`` extra).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

Built = tuple[nn.Module, Any]


def _seeded(build: Callable[[], Built]) -> Callable[[], Built]:
    def seeded() -> Built:
        torch.manual_seed(0)
        model, inputs = build()
        return model.eval(), inputs
    seeded.__doc__ = build.__doc__
    return seeded


# --- Hugging Face transformers (small configs) ---------------------------------------------------------
def _hf(config_name: str, model_name: str, inputs: Callable[[Any], Any], **config: Any) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg), inputs(cfg)
    return _seeded(build)


def _image(size: int = 64) -> Callable[[Any], tuple]:
    return lambda cfg: (torch.randn(1, 3, size, size),)


def _tokens(length: int = 16, mask: bool = True) -> Callable[[Any], dict]:
    def make(cfg) -> dict:
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if mask else {"input_ids": ids}
    return make


_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)

HF_VISION = {
    "vit": _hf("ViTConfig", "ViTForImageClassification", _image(64), image_size=64, patch_size=16, **_VIT),
    "deit": _hf("DeiTConfig", "DeiTForImageClassification", _image(64), image_size=64, patch_size=16, **_VIT),
    "convnext": _hf("ConvNextConfig", "ConvNextForImageClassification", _image(64), hidden_sizes=[16, 32, 64, 128],
                    depths=[1, 1, 2, 1]),
    "swin": _hf("SwinConfig", "SwinForImageClassification", _image(128), image_size=128, patch_size=4, embed_dim=32,
                depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4], window_size=4),
    "segformer": _hf("SegformerConfig", "SegformerForSemanticSegmentation", _image(64), hidden_sizes=[16, 32, 64, 128],
                     depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 4], decoder_hidden_size=64),
    "mobilevit": _hf("MobileViTConfig", "MobileViTForImageClassification", _image(64), image_size=64,
                     hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160]),
    "resnet": _hf("ResNetConfig", "ResNetForImageClassification", _image(64), embedding_size=16,
                  hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
    "detr": _hf("DetrConfig", "DetrForObjectDetection", _image(64), use_timm_backbone=False,
                use_pretrained_backbone=False, backbone="resnet18", d_model=64, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                num_queries=10, backbone_config={"model_type": "resnet", "embedding_size": 16,
                                                 "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                                                 "out_features": ["stage4"]}),
}

HF_TEXT = {
    "bert": _hf("BertConfig", "BertForSequenceClassification", _tokens(), **_TEXT),
    "distilbert": _hf("DistilBertConfig", "DistilBertForSequenceClassification", _tokens(), vocab_size=512, dim=64,
                      n_layers=2, n_heads=4, hidden_dim=128),
    "roberta": _hf("RobertaConfig", "RobertaForSequenceClassification", _tokens(), **_TEXT),
    "electra": _hf("ElectraConfig", "ElectraForSequenceClassification", _tokens(), embedding_size=64, **_TEXT),
    "gpt2": _hf("GPT2Config", "GPT2LMHeadModel", _tokens(mask=False), vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0),
}


# --- ultralytics YOLO from its yaml ------------------------------------------------------------------------
def _yolo(yaml: str) -> Callable[[], Built]:
    def build() -> Built:
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(yaml, verbose=False), (torch.randn(1, 3, 128, 128),)
    return _seeded(build)


YOLO = {"yolov8n": _yolo("yolov8n.yaml"), "yolo11n": _yolo("yolo11n.yaml")}


# --- segmentation_models_pytorch -------------------------------------------------------------------------
def _smp(architecture: str, **options: Any) -> Callable[[], Built]:
    def build() -> Built:
        import segmentation_models_pytorch as smp

        model = getattr(smp, architecture)(encoder_name="resnet18", encoder_weights=None, classes=3, **options)
        return model, (torch.randn(1, 3, 128, 128),)
    return _seeded(build)


SMP = {name: _smp(name) for name in ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet",
                                     "MAnet", "PAN")}


# --- torchvision video and detection backbones -------------------------------------------------------------
def _video(name: str, frames: int = 8, size: int = 112) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision

        return torchvision.models.get_model(name, weights=None), (torch.randn(1, 3, frames, size, size),)
    return _seeded(build)


VIDEO = {"r3d_18": _video("r3d_18"), "mc3_18": _video("mc3_18"), "r2plus1d_18": _video("r2plus1d_18"),
         "s3d": _video("s3d", 16, 224), "swin3d_t": _video("swin3d_t", 8, 112),
         "mvit_v2_s": _video("mvit_v2_s", 16, 224)}


def _backbone(name: str, size: int = 224) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision

        detector = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        return detector.backbone, (torch.randn(1, 3, size, size),)
    return _seeded(build)


DETECTION_BACKBONES = {name: _backbone(name, size) for name, size in (
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 320), ("retinanet_resnet50_fpn", 224), ("fcos_resnet50_fpn", 224),
    ("ssd300_vgg16", 300), ("ssdlite320_mobilenet_v3_large", 320), ("maskrcnn_resnet50_fpn", 224))}


def _detector(name: str, size: int, **options: Any) -> Callable[[], Built]:
    """A whole torchvision detector (transform, backbone, heads, post-processing) on one image: what
    fxprune captures in parts (``frontends/partition.py``)."""
    def build() -> Built:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **options)
        return model, ([torch.rand(3, size, size)],)
    return _seeded(build)


_SMALL = dict(min_size=320, max_size=320)  # the R-CNNs, RetinaNet and FCOS resize to 800 by default
DETECTORS = {name: _detector(name, size, **options) for name, size, options in (
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 320, {}), ("retinanet_resnet50_fpn", 320, _SMALL),
    ("fcos_resnet50_fpn", 320, _SMALL), ("ssd300_vgg16", 300, {}), ("ssdlite320_mobilenet_v3_large", 320, {}),
    ("maskrcnn_resnet50_fpn", 320, _SMALL), ("keypointrcnn_resnet50_fpn", 320, _SMALL))}


def _flow(name: str, size: int = 128) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision

        return torchvision.models.get_model(name, weights=None), (torch.rand(1, 3, size, size),
                                                                  torch.rand(1, 3, size, size))
    return _seeded(build)


FAMILIES: dict[str, dict[str, Callable[[], Built]]] = {
    "hf_vision": HF_VISION, "hf_text": HF_TEXT, "yolo": YOLO, "smp": SMP, "torchvision_video": VIDEO,
    "detection_backbones": DETECTION_BACKBONES, "detectors": DETECTORS,
    "optical_flow": {"raft_small": _flow("raft_small")},
}


def build(family: str, name: str) -> Built:
    """``(model, example_inputs)`` of one model of one family, random weights, eval mode."""
    return FAMILIES[family][name]()
