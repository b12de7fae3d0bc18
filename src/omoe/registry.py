"""The names a config may give: adapter methods, MoE topologies and routings, each listed once.

``OMoEConfig`` checks its fields against these tables, ``omoe.tuners.injection`` builds a method
from its :class:`Method` entry and implements every topology here, and ``omoe.layers.router``
implements every routing. A new method is one line here if it is a combination of the existing
parts; a new topology or routing is a line here plus its code in injection or the router
(tests/test_registry.py checks that each name has one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """What an adapter method is made of."""

    name: str
    mixture: bool  # a router and experts per FFN block or linear (True), or one adapter per linear
    orthogonal: bool  # OMoE: the experts' representations are orthonormalised before mixing (Eq. (7))
    dora: bool  # DoRA experts whatever use_dora says
    help: str


METHODS = {
    m.name: m
    for m in (
        Method("lora", mixture=False, orthogonal=False, dora=False, help="single LoRA adapter per linear"),
        Method("dora", mixture=False, orthogonal=False, dora=True, help="single DoRA adapter per linear"),
        Method("moe", mixture=True, orthogonal=False, dora=False, help="vanilla MoE-LoRA (Eq. (3))"),
        Method("omoe", mixture=True, orthogonal=True, dora=False, help="OMoE: Gram-Schmidt, then the mixture"),
    )
}
TOPOLOGIES = {
    "ffn": "one router and k experts per block MLP, each a LoRA on gate/up/down (the paper's; MixLoRA)",
    "linear": "a router and k experts on every target linear (MoELoRA / LoRAMoE)",
}
ROUTINGS = {
    "soft": "every expert, weighted by the router's softmax",
    "topk": "the top_k largest, renormalised to sum to 1 (Eq. (3))",
    "switch": "the largest only, weighted by its raw probability (Switch Transformer)",
}
