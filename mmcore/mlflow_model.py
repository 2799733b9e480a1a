"""The pyfunc entry MLflow loads from code (no pickle): the model class lives in mmcore.tracking."""

from mlflow.models import set_model

from mmcore.tracking import PyfuncModel

set_model(PyfuncModel())
