"""The method registry: ``peft_type`` -> what the trainer, exporter and loader need.

A method registers one ``Method`` from its own folder. Nothing outside a method's
folder branches on the method's name: the PeftModel asks ``method.tuner`` to
inject layers, and the exporter asks ``method.slots`` what slots it has.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgepeft.config import register_config
from edgepeft.errors import UnsupportedMethodError


@dataclass(frozen=True)
class Method:
    name: str  # short name; also the prefix of its parameters ("lora_") and slots ("lora_A.")
    config_cls: type  # a PeftConfig subclass with peft_type_name set
    tuner: object  # inject(model, config, adapter_name), merge(model, adapter_name), layers(model)
    slots: object  # slot_table(model, config), install(model, slots), values(peft_model, adapter_name)

    @property
    def peft_type(self) -> str:
        return self.config_cls.peft_type_name


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    register_config(method.config_cls)
    _METHODS[method.peft_type] = method
    return method


def method_for(config) -> Method:
    import edgepeft.tuners  # noqa: F401  (registers the built-in methods)

    method = _METHODS.get(config.peft_type)
    if method is None:
        raise UnsupportedMethodError(f"peft_type {config.peft_type!r} is not supported; use one of {', '.join(sorted(_METHODS))}")
    return method


def methods() -> list[Method]:
    import edgepeft.tuners  # noqa: F401

    return list(_METHODS.values())
