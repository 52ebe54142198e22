"""One registry of per-layer behaviour, and `register_layer`, the public way to extend tf_psp.

For a layer class, a *handler* (see `tf_psp.handlers`) says in one place:

- how channels flow through the layer (`kind`, `couple`, `constants`,
  `needed_inputs`): what `strip_and_shrink`, `parameterize(coupling='group')`
  and the pruning plan read;
- how the layer is rebuilt narrower (`rebuild`): what `strip_and_shrink` does;
- its MAC rule (`macs`): what `tf_psp.profile`, `cost='macs'` and the budget
  functions count.

The built-in Keras layers are registered through the same function
(`tf_psp.graph` registers them when it is imported), so the extension path is
the one every test exercises.

Lookup walks the layer's class hierarchy (its MRO): the first registered class
wins. For the channel graph, a subclass of a registered class is only trusted
when it does not override `call` (a subclass with its own `call` may compute
something else: it is frozen, with that reason, until it is registered
itself); MAC rules are inherited by every subclass (PSP layers count like
their Keras parents).
"""

import copy

HANDLERS = {}  # layer class -> handler class or instance


def register_layer(layer_class: type, handler) -> type:
    """Registers how tf_psp treats `layer_class` (and subclasses that keep its `call`).

    Args:
        layer_class: a `keras.layers.Layer` subclass (or a keras.ops
            operation class).
        handler: a `tf_psp.handlers.LayerHandler` instance or subclass, e.g.
            `tf_psp.handlers.Channelwise(weights=["gamma"])`.

    Returns:
        `layer_class`, so the function can decorate a class definition:
        `@tf_psp.register_layer.with_handler(...)` is not needed; call it after.

    Raises:
        TypeError: `layer_class` is not a class, or `handler` lacks the
            handler interface.
    """
    if not isinstance(layer_class, type):
        raise TypeError(f"register_layer: layer_class must be a class, got {layer_class!r}.")
    missing = [name for name in ("kind", "couple", "constants", "needed_inputs", "rebuild",
                                 "frozen_reason") if not hasattr(handler, name)]
    if missing:
        raise TypeError(
            f"register_layer({layer_class.__name__}): handler {handler!r} lacks {missing}; "
            "subclass tf_psp.handlers.LayerHandler (or PassThrough / Channelwise).")
    HANDLERS[layer_class] = handler
    return layer_class


def unregister_layer(layer_class: type) -> None:
    """Removes a registration (a built-in layer then falls back to its parent's, if any)."""
    HANDLERS.pop(layer_class, None)


def _instance(handler):
    return handler() if isinstance(handler, type) else copy.copy(handler)


def registered_class(layer):
    """The nearest class in `type(layer).__mro__` with a registration, or None."""
    for cls in type(layer).__mro__:
        if cls in HANDLERS:
            return cls
    return None


def handler_for(layer, default):
    """`(handler instance, reason)` for the channel graph.

    `reason` is None, or why `layer` is frozen although an ancestor is
    registered (it overrides `call`). `default` (a handler class) is used when
    nothing applies.
    """
    cls = registered_class(layer)
    if cls is None:
        return default(), None
    if cls is not type(layer):
        overrides = [c for c in type(layer).__mro__[: type(layer).__mro__.index(cls)]
                     if "call" in vars(c)]
        if overrides:
            return default(), (f"subclasses {cls.__name__} with its own call(); register it "
                               "with tf_psp.register_layer")
    return _instance(HANDLERS[cls]), None


def mac_handler(layer):
    """The registered handler whose `macs` counts `layer`, or None.

    Read-only use, so a registered instance is returned as it is (no copy per
    call: `profile` asks for every layer of every model it counts).
    """
    cls = registered_class(layer)
    if cls is None or not hasattr(HANDLERS[cls], "macs"):
        return None
    handler = HANDLERS[cls]
    return handler() if isinstance(handler, type) else handler
