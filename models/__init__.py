"""Reference perception and safety models, their data generators, metrics and training recipes.

    model = fxopt.models.create("pointpillars", preset="kitti")
    inputs = fxopt.models.example_inputs("pointpillars", preset="kitti")
    result = fxopt.models.train("pointpillars", steps=200)
"""

from fxopt.extensions import register_extension
from fxopt.models.registry import (
    ModelSpec,
    TrainingRecipe,
    create,
    example_inputs,
    names,
    register_model,
    spec,
    spec_of_model,
)
from fxopt.models.training import TrainResult, recipe, train

register_extension("model_spec", "of_model", spec_of_model)  # the core asks which spec (safety policy, precision) a model has

__all__ = [
    "ModelSpec", "TrainResult", "TrainingRecipe", "create", "example_inputs", "names",
    "recipe", "register_model", "spec", "train",
]
