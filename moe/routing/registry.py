"""The routers gin can name, registered where each is defined.

`@register_router` makes a router spec configurable as `moe.routing.<Name>` (the name model
gins use, e.g. `encoder/moe.routing.TokenChoice.num_selected_experts = 2`) and lists it in
`ROUTERS`, which tools that iterate over every router (benchmarks, comparisons) read.
"""

from __future__ import annotations

import contextlib

import gin

ROUTERS: dict[str, type] = {}


def register_router(cls: type) -> type:
    """Class decorator: gin-register a router spec under `moe.routing` and list it."""
    with contextlib.suppress(ValueError):  # already registered: a module reload
        gin.external_configurable(cls, module="moe.routing")
    ROUTERS[cls.__name__] = cls
    return cls
