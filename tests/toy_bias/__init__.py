"""A toy method, registered from the test folder: a learned bias added to each target layer's output.

    y = base(x) + b          b: (out,) per target layer, zero at start (the adapter starts as a no-op)

It shows the seam a method plugs in through (``edgepeft.registry``): a config class, a layer, a
tuner and a slot spec in one folder, one ``register_method`` call, and no edit anywhere else.
"""
from edgepeft.registry import Method, register_method

from .config import ToyBiasConfig
from .model import ToyBiasTuner
from .slots import ToyBiasSlots

TOY_BIAS = register_method(Method(name="toybias", config_cls=ToyBiasConfig, tuner=ToyBiasTuner(), slots=ToyBiasSlots()))
