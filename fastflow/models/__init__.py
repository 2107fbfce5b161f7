"""Ready flows: NICE, RealNVP, Glow, MAF, IAF, NeuralSplineFlow (each a :class:`fastflow.Flow`)."""

from fastflow.models.cnf import CNF
from fastflow.models.glow import Glow
from fastflow.models.maf import IAF, MAF
from fastflow.models.nice import NICE
from fastflow.models.nsf import NeuralSplineFlow
from fastflow.models.realnvp import RealNVP
from fastflow.models.tarflow import TarFlow

__all__ = ["CNF", "Glow", "IAF", "MAF", "NICE", "NeuralSplineFlow", "RealNVP", "TarFlow"]
