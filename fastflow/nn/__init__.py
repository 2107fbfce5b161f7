"""Drop-in flow layers (``torch.nn`` modules): ``forward(x, context=None) -> (z, logdet)`` maps
data to latent, ``inverse(z, context=None) -> (x, logdet)`` maps back."""

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.autoregressive import InverseAutoregressive, MaskedAffineAutoregressive
from fastflow.nn.base import Compose, Transform
from fastflow.nn.continuous import ContinuousFlow, VectorField
from fastflow.nn.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ChannelsLastSequential,
    MLPAffineCoupling,
    checkerboard_mask,
    conv_subnet,
    mlp_subnet,
)
from fastflow.nn.glow_step import GlowConditioner, GlowStep
from fastflow.nn.invconv import InvConv1x1
from fastflow.nn.lulinear import LULinear
from fastflow.nn.made import MADE
from fastflow.nn.marginal import PiecewiseLinearMarginal
from fastflow.nn.permutation import RandomPermutation, Reverse
from fastflow.nn.planar import BatchNormFlow, PlanarFlow, RadialFlow
from fastflow.nn.recompute import invertible_checkpoint
from fastflow.nn.shape import Flatten, Split, Squeeze
from fastflow.nn.spline import SplineAutoregressive, SplineCoupling, SplineInverseAutoregressive
from fastflow.nn.transformer import Patchify, TransformerAutoregressive

__all__ = [
    "ActNorm",
    "BatchNormFlow",
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelsLastSequential",
    "MLPAffineCoupling",
    "Compose",
    "ContinuousFlow",
    "Flatten",
    "GlowConditioner",
    "GlowStep",
    "InvConv1x1",
    "InverseAutoregressive",
    "LULinear",
    "MADE",
    "MaskedAffineAutoregressive",
    "PiecewiseLinearMarginal",
    "PlanarFlow",
    "RadialFlow",
    "Patchify",
    "RandomPermutation",
    "Reverse",
    "Split",
    "SplineAutoregressive",
    "SplineCoupling",
    "SplineInverseAutoregressive",
    "Squeeze",
    "Transform",
    "TransformerAutoregressive",
    "VectorField",
    "checkerboard_mask",
    "conv_subnet",
    "invertible_checkpoint",
    "mlp_subnet",
]
