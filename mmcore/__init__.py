"""mmpipe core library: data, models, losses, tasks, training, evaluation, tracking."""


def load_model(uri: str):
    """The native nn.Module of a registered model, e.g. load_model("models:/mmpipe-contrastive@champion")."""
    from mmcore.registry import load_model as load

    return load(uri)[0]
