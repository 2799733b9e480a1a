"""The pyfunc entry MLflow loads from code (no pickle): the model class lives in mmcore.pyfunc."""

from mlflow.models import set_model

from mmcore.pyfunc import PyfuncModel

set_model(PyfuncModel())
