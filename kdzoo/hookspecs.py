"""The plugin contract: the hooks a kdzoo plugin may implement.

A plugin is a module (or any object) reachable through an entry point in the ``kdzoo``
group. It implements one or more of the hooks below with the ``@hookimpl`` marker::

    from kdzoo import hookimpl

    @hookimpl
    def register_methods(register):
        register(MyMethod)

Each hook receives a ``register`` callback, in the style of simonw/llm and datasette.
"""
import pluggy

hookspec = pluggy.HookspecMarker("kdzoo")
hookimpl = pluggy.HookimplMarker("kdzoo")


@hookspec
def register_methods(register):
    """Register distillation methods.

    ``register(method_class, name=None)``: ``method_class`` is a subclass of
    :class:`kdzoo.methods.Method`. ``name`` defaults to ``method_class.name``.
    """


@hookspec
def register_models(register):
    """Register backbones.

    ``register(name, factory)``: ``factory(num_classes=10, pretrained=False, **kwargs)``
    returns an ``nn.Module`` whose ``forward`` maps an image batch ``(B, 3, H, W)`` to logits
    ``(B, num_classes)``. timm-style models (``forward_intermediates``, ``feature_info``,
    ``forward_head``) give exact stage features; plain modules are handled with hooks.

    ``register.family(list_names, make_factory, description)`` registers many names lazily, for a
    plugin whose names are costly to list (the timm plugin: importing timm takes seconds).
    ``list_names()`` returns every name of the family; kdzoo calls it once, the first time a model
    is looked up or listed, never for commands that need only methods. ``make_factory(name)``
    returns the factory of one listed name, when that name is first used. ``description`` (a few
    words) is what ``kdzoo plugins`` shows instead of a count. A family name that another
    registration also has is an error naming both plugins when that name is used. Keep the hook
    and the module that defines it free of heavy imports: do them inside the two callables.
    """
