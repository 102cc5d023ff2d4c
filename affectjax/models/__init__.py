"""Backbones, heads and device-side preprocessing."""
from affectjax.models.affect import AffectModel
from affectjax.models.affect import create_backbone
from affectjax.models.affect import create_model
from affectjax.models.affect import default_model_config
from affectjax.models.heads import MultiTaskHead
from affectjax.models.resnet import ResNet
