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


@hookspec
def register_datasets(register):
    """Register datasets.

    ``register(dataset_class, name=None)``: ``dataset_class`` is a subclass of
    :class:`kdzoo.datasets.Dataset`; ``name`` defaults to ``dataset_class.name``. Keep the module
    light: a dataset class imports what it reads with inside ``load``.
    """


@hookspec
def register_checkpoint_formats(register):
    """Register readers of teacher checkpoints written by other code bases.

    ``register(name, convert, pretrained=None)``: ``name`` is what ``format:`` (a benchmark teacher)
    and ``--teacher-format`` (``kdzoo distill``) say; ``kdzoo`` is kdzoo's own format and cannot be
    registered. ``convert(model_name, payload)`` receives the kdzoo model name the user gave and the
    file as ``torch.load(path, map_location="cpu", weights_only=True)`` returned it (kdzoo reads the
    file; a converter never does), and returns the ``dict[str, Tensor]`` state dict of that kdzoo
    network: every key, every shape. kdzoo builds the network with the run's number of classes and
    checks the result key by key before loading it, so a converter renames and never guesses. It
    raises :class:`kdzoo.KDZooError` for a model the format cannot map (saying which models it
    supports) or a payload that is not of its format.

    ``pretrained(model_name, dataset, folder)``, optional, makes ``pretrained: NAME`` work: it returns
    the path of the published weights of ``model_name`` for ``dataset``, downloading them into
    ``folder`` (``$KDZOO_CACHE/pretrained/NAME``) when they are not there, and raises ``KDZooError``
    when there are none or they cannot be fetched (offline: say where to put the file by hand).
    """


@hookspec
def register_observers(register):
    """Register run observers: experiment trackers that follow runs (TensorBoard, MLflow, W&B...).

    ``register(observer_class, name=None)``: ``observer_class`` is a subclass of
    :class:`kdzoo.observers.Observer`; ``name`` (what ``--log NAME`` and ``loggers:`` say) defaults to
    ``observer_class.name``. Its ``Options`` dataclass declares its settings. Keep the module light:
    import the tracker's package inside the observer's methods (``check`` at validation, ``start``), never
    at the top, and say its pip command in the ``KDZooError`` that ``check`` raises when it is missing.
    """
