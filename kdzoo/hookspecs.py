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
    """
