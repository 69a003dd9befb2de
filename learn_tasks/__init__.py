"""learn: LEARN (frozen-LLM item knowledge for recommendation) as an orchestrated system.

Subpackages follow the data flow, lowest layer first; a module imports only from its own subpackage or
from a lower layer (``tests/test_architecture.py`` holds the order):

``config``, ``schema``, ``storage``, ``processes`` (core) -> ``data`` -> ``ceg`` -> ``pch`` ->
``evaluation`` -> ``training`` -> ``online`` -> ``monitoring`` -> ``orchestration`` -> ``ops`` -> ``cli``
"""
